//! The daemon loop: fetch the watched branch on an interval (with jitter), at once on a signed
//! webhook or a change of a local repository; reconcile each new revision, plan pull request
//! refs without applying, check drift on a schedule, and commit a status report after every
//! run. One run at a time; a shutdown stops an apply between two steps.

use super::config::DaemonSettings;
use super::decide::{self, Retry, Revisions};
use super::gitops::{Mirror, glob_match};
use super::metrics::{self, Metrics, ReconcileKind};
use super::server::{self, ServerState, Trigger};
use super::status::{Outcome, RunKind};
use super::worker::{self, RunJob, RunResult, Schedule};
use crate::ports::System;
use crate::settings::RunSettings;
use anyhow::{Context, Result};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, mpsc};

/// What the daemon remembers between runs.
#[derive(Debug, Default)]
struct Memory {
    revisions: Revisions,
    /// The failed revision and when to try it again (backoff); an invalid revision is never
    /// retried: it stalls until a new commit.
    retry: Option<(Retry, Instant)>,
    /// Pull request refs: the commit last planned for each.
    planned: BTreeMap<String, String>,
    /// The schedule of the last revision that loaded.
    schedule: Option<Schedule>,
}

pub struct Daemon {
    settings: DaemonSettings,
    run: RunSettings,
    mirror: Arc<Mirror>,
    metrics: Arc<Metrics>,
    stop: Arc<AtomicBool>,
    memory: Memory,
}

/// Up to 10% of `d`, from the clock's nanoseconds: enough to spread many daemons' polls.
fn jitter(d: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|t| t.subsec_nanos())
        .unwrap_or(0);
    decide::jitter(d, nanos)
}

/// The branch's full ref name.
fn branch_ref(branch: &str) -> String {
    if branch.starts_with("refs/") {
        branch.to_string()
    } else {
        format!("refs/heads/{branch}")
    }
}

impl Daemon {
    /// Run one revision in a worker process (see `worker`), then keep what it tells.
    async fn run_revision(&mut self, git_ref: &str, commit: &str, kind: RunKind) {
        let clock = Instant::now();
        let job = RunJob {
            settings: self.settings.clone(),
            run: self.run.clone(),
            git_ref: git_ref.to_string(),
            commit: commit.to_string(),
            kind,
            revisions: self.memory.revisions.clone(),
        };
        let result = match worker::run_in_worker(&job, &self.stop).await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(%commit, %git_ref, error = %e, "the run failed without a report");
                self.report_lost_run(&job, &e).await
            }
        };
        for system in &result.api_errors {
            self.metrics.record_api_error(*system);
        }
        if let Some(drifted) = result.drifted {
            self.metrics.set_drifted_guests(drifted);
        }
        if let Some(schedule) = &result.schedule {
            self.memory.schedule = Some(schedule.clone());
        }
        if kind == RunKind::Reconcile {
            self.memory.revisions = self.memory.revisions.after(kind, commit, result.outcome);
            if matches!(result.outcome, Outcome::Applied | Outcome::NoChanges) {
                self.metrics.set_last_applied(commit);
            }
            let previous = self.memory.retry.take().map(|(r, _)| r);
            self.memory.retry = decide::retry_after(previous.as_ref(), commit, result.outcome).map(|r| {
                tracing::warn!(%commit, attempts = r.attempts, retry_in = ?r.backoff, "reconcile failed; retrying with backoff");
                let at = Instant::now() + r.backoff;
                (r, at)
            });
        }
        let m_kind = match kind {
            RunKind::Reconcile => ReconcileKind::Reconcile,
            RunKind::PullRequest => ReconcileKind::PullRequest,
            RunKind::Drift => ReconcileKind::Drift,
        };
        let m_outcome = match result.outcome {
            Outcome::Applied | Outcome::Planned | Outcome::DriftFound => metrics::Outcome::Success,
            Outcome::NoChanges | Outcome::NoDrift | Outcome::Suspended => metrics::Outcome::NoChange,
            Outcome::Invalid => metrics::Outcome::Stalled,
            Outcome::Failed => metrics::Outcome::Failure,
        };
        self.metrics.record_reconcile(m_kind, m_outcome, clock.elapsed());
        super::memory::release_free_memory();
    }

    /// A worker that crashed or was killed left no report: the daemon writes one itself, so
    /// the status branch and the forge never wait for a run that ended.
    async fn report_lost_run(&self, job: &RunJob, error: &str) -> RunResult {
        let now = worker::now_rfc3339();
        let mut report = job.report(now.clone());
        report.errors.push(error.to_string());
        job.finish(&mut report, now);
        let mut api_errors = Vec::new();
        if !worker::publish(&self.mirror, &self.settings, &report, &[]).await {
            api_errors.push(System::Git);
        }
        match worker::forge_client(&self.settings) {
            Ok(forge) => {
                let context = worker::forge_context(job.kind);
                let state = worker::forge_state(Outcome::Failed);
                worker::forge_status(forge.as_ref(), &job.commit, state, context, Outcome::Failed.explain()).await;
            }
            Err(e) => tracing::warn!(error = %e, "cannot set the commit status on the forge"),
        }
        RunResult {
            outcome: Outcome::Failed,
            drifted: None,
            api_errors,
            schedule: None,
        }
    }

    /// Fetch, then run what is new: the watched branch, then pull request refs.
    async fn poll(&mut self, ready: &AtomicBool) {
        let mut specs = vec![format!(
            "+{}:{}",
            branch_ref(&self.settings.branch),
            branch_ref(&self.settings.branch)
        )];
        for p in &self.settings.plan_refs {
            specs.push(format!("+{p}:{p}"));
        }
        let mirror = self.mirror.clone();
        let refs = match tokio::task::spawn_blocking(move || mirror.fetch(&specs)).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                self.metrics.record_api_error(System::Git);
                tracing::error!(error = %e, "fetch failed");
                return;
            }
            Err(e) => {
                tracing::error!(error = %e, "fetch task failed");
                return;
            }
        };
        ready.store(true, Ordering::Release);
        let watched = branch_ref(&self.settings.branch);
        if let Some(commit) = refs.get(&watched).cloned() {
            let retry_due = self
                .memory
                .retry
                .as_ref()
                .filter(|(_, at)| Instant::now() >= *at)
                .map(|(r, _)| r.commit.as_str());
            if decide::reconcile_due(&self.memory.revisions, retry_due, &commit) {
                tracing::info!(%commit, git_ref = %watched, "reconciling");
                self.run_revision(&watched, &commit, RunKind::Reconcile).await;
            }
        } else {
            tracing::warn!(branch = %self.settings.branch, "the watched branch does not exist in the repository");
        }
        for (name, commit) in refs {
            if name == watched || name == branch_ref(&self.settings.status_branch) || self.stop.load(Ordering::SeqCst) {
                continue;
            }
            if !self.settings.plan_refs.iter().any(|p| glob_match(p, &name)) {
                continue;
            }
            if self.memory.planned.get(&name) != Some(&commit) {
                tracing::info!(%commit, git_ref = %name, "planning a pull request ref");
                self.run_revision(&name, &commit, RunKind::PullRequest).await;
                self.memory.planned.insert(name, commit);
            }
        }
    }

    async fn drift(&mut self) {
        let revisions = &self.memory.revisions;
        let Some(commit) = revisions
            .last_applied
            .clone()
            .or_else(|| revisions.last_attempted.clone())
        else {
            return;
        };
        let watched = branch_ref(&self.settings.branch);
        tracing::info!(%commit, "checking drift");
        self.run_revision(&watched, &commit, RunKind::Drift).await;
    }
}

fn next_drift(settings: &DaemonSettings, cluster_schedule: Option<&str>) -> Option<Instant> {
    let wait = decide::until_next_drift(
        settings.drift_interval,
        settings.drift_schedule.as_deref(),
        cluster_schedule,
        chrono::Utc::now(),
    )?;
    Some(Instant::now() + wait)
}

/// Stops a running daemon: set `stop`, then `notify_waiters` on `shutdown`.
#[derive(Clone, Default)]
pub struct Control {
    pub stop: Arc<AtomicBool>,
    pub shutdown: Arc<Notify>,
}

impl Control {
    pub fn request_stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.shutdown.notify_waiters();
    }
}

/// Run the daemon until SIGTERM or SIGINT.
pub async fn run(settings: DaemonSettings, run: RunSettings) -> Result<()> {
    let control = Control::default();
    {
        let control = control.clone();
        tokio::spawn(async move {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("signal handler");
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            tracing::info!("shutting down: finishing the current step");
            control.request_stop();
        });
    }
    run_until(settings, run, control).await
}

/// Run the daemon until `control` asks it to stop.
pub async fn run_until(settings: DaemonSettings, run: RunSettings, control: Control) -> Result<()> {
    std::fs::create_dir_all(&settings.state_dir)
        .with_context(|| format!("cannot create the state directory {}", settings.state_dir.display()))?;
    let mirror = {
        let (url, dir, auth) = (
            settings.repository.clone(),
            settings.state_dir.join("mirror"),
            worker::git_auth(&settings),
        );
        tokio::task::spawn_blocking(move || Mirror::open_or_init(&url, &dir, auth)).await??
    };
    // Checked at start, so a missing forge token is an error now, not in every run.
    worker::forge_client(&settings)?;
    let metrics = Arc::new(Metrics::new());
    let ready = Arc::new(AtomicBool::new(false));
    let (stop, shutdown) = (control.stop.clone(), control.shutdown.clone());
    let (trigger_tx, mut trigger_rx) = mpsc::channel::<Trigger>(1);

    let webhook_secret = match &settings.webhook_secret_file {
        Some(p) => Some(
            std::fs::read(p)
                .with_context(|| format!("cannot read the webhook secret {}", p.display()))?
                .trim_ascii()
                .to_vec(),
        ),
        None => None,
    };
    let listener = tokio::net::TcpListener::bind(&settings.listen)
        .await
        .with_context(|| format!("cannot listen on {}", settings.listen))?;
    let server_state = ServerState {
        metrics: metrics.clone(),
        ready: ready.clone(),
        webhook_secret,
        trigger: trigger_tx,
    };
    let server_shutdown = shutdown.clone();
    let server = tokio::spawn(async move {
        server::serve(listener, server_state, async move { server_shutdown.notified().await }).await
    });

    // A local repository is watched: a commit there is noticed at once.
    let (watch_tx, mut watch_rx) = mpsc::channel::<()>(1);
    let _watcher = watch_local(&settings.repository, watch_tx);

    let mut daemon = Daemon {
        settings,
        run,
        mirror: Arc::new(mirror),
        metrics,
        stop: stop.clone(),
        memory: Memory::default(),
    };
    let mut drift_at: Option<Instant> = None;
    tracing::info!(repository = %super::gitops::display_url(&daemon.settings.repository), branch = %daemon.settings.branch, "daemon started");
    loop {
        daemon.poll(&ready).await;
        if stop.load(Ordering::SeqCst) {
            break;
        }
        // The repository's own policy, as the last run that loaded it reported.
        let cluster_interval = daemon.memory.schedule.as_ref().and_then(|p| p.interval);
        let cluster_schedule = daemon.memory.schedule.as_ref().map(|p| p.drift_schedule.clone());
        if drift_at.is_none() {
            drift_at = next_drift(&daemon.settings, cluster_schedule.as_deref());
        }
        let interval = decide::poll_interval(daemon.settings.poll_interval, cluster_interval);
        let mut poll_at = Instant::now() + interval + jitter(interval);
        if let Some((_, at)) = &daemon.memory.retry {
            poll_at = poll_at.min(*at);
        }
        let drift_sleep = async {
            match drift_at {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = tokio::time::sleep_until(poll_at.into()) => {}
            Some(t) = trigger_rx.recv() => tracing::info!(trigger = ?t, "webhook: fetching now"),
            Some(()) = watch_rx.recv() => tracing::info!("local repository changed: fetching now"),
            _ = drift_sleep => {
                daemon.drift().await;
                drift_at = next_drift(&daemon.settings, cluster_schedule.as_deref());
            }
            _ = shutdown.notified() => {}
        }
        if stop.load(Ordering::SeqCst) {
            break;
        }
    }
    shutdown.notify_waiters();
    let _ = server.await;
    tracing::info!("daemon stopped");
    Ok(())
}

/// Watch a local repository's refs with notify; nothing for URLs.
fn watch_local(repository: &str, tx: mpsc::Sender<()>) -> Option<notify::RecommendedWatcher> {
    use notify::Watcher;
    let path = std::path::Path::new(repository.strip_prefix("file://").unwrap_or(repository));
    if repository.contains("://") && !repository.starts_with("file://") || !path.exists() {
        return None;
    }
    let refs = if path.join(".git").is_dir() {
        path.join(".git")
    } else {
        path.to_path_buf()
    };
    let mut watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        // Only writes: reading refs (our own fetch does) must not trigger another fetch.
        let is_write = |k: &notify::EventKind| {
            matches!(
                k,
                notify::EventKind::Create(_) | notify::EventKind::Modify(_) | notify::EventKind::Remove(_)
            )
        };
        if ev.is_ok_and(|e| {
            is_write(&e.kind)
                && e.paths
                    .iter()
                    .any(|p| p.to_string_lossy().contains("refs") || p.ends_with("packed-refs"))
        }) {
            let _ = tx.try_send(());
        }
    })
    .ok()?;
    watcher.watch(&refs, notify::RecursiveMode::Recursive).ok()?;
    Some(watcher)
}
