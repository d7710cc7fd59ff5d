//! The daemon loop: fetch the watched branch on an interval (with jitter), at once on a signed
//! webhook or a change of a local repository; reconcile each new revision, plan pull request
//! refs without applying, check drift on a schedule, and commit a status report after every
//! run. One run at a time; a shutdown stops an apply between two steps.

use super::config::DaemonSettings;
use super::forge::{CommitState, ForgeClient};
use super::gitops::{GitAuth, Mirror, glob_match};
use super::metrics::{self, ApiSystem, Metrics, ReconcileKind};
use super::server::{self, ServerState, Trigger};
use super::status::{self, Outcome, RunKind, StatusReport};
use crate::apply::{Applier, ApplyReport, Progress, StepOutcome};
use crate::cluster::access::ClusterAccess;
use crate::commands::{cluster_access, observe_and_plan_all};
use crate::connect::AnyHostShell;
use crate::connect::ConnectArgs;
use crate::model::{self, Desired, LoadOptions, RepoFiles};
use crate::plan::{Plan, Step};
use crate::render::{self, Artifact};
use anyhow::{Context, Result};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, mpsc};

/// What the daemon remembers between runs.
#[derive(Debug, Default)]
struct Memory {
    last_attempted: Option<String>,
    last_applied: Option<String>,
    /// The failed revision and when to try it again (backoff); an invalid revision is never
    /// retried: it stalls until a new commit.
    retry: Option<(String, Instant, u32)>,
    /// Pull request refs: the commit last planned for each.
    planned: BTreeMap<String, String>,
}

pub struct Daemon {
    settings: DaemonSettings,
    connect: ConnectArgs,
    mirror: Arc<Mirror>,
    metrics: Arc<Metrics>,
    stop: Arc<AtomicBool>,
    forge: Option<ForgeClient>,
    memory: Memory,
}

fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// Up to 10% of `d`, from the clock's nanoseconds: enough to spread many daemons' polls.
fn jitter(d: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|t| t.subsec_nanos())
        .unwrap_or(0);
    d.mul_f64(f64::from(nanos % 1000) / 10_000.0)
}

struct LogProgress;

impl Progress for LogProgress {
    fn step_started(&mut self, index: usize, total: usize, step: &Step) {
        tracing::info!(step = index + 1, total, action = step.action.verb(), node = %step.node, vmid = step.vmid, "applying");
    }
    fn step_finished(&mut self, o: &StepOutcome) {
        match &o.error {
            None => tracing::info!(node = %o.node, action = o.action, log = %o.log.join(", "), "step done"),
            Some(e) => tracing::error!(node = %o.node, action = o.action, error = %e, "step failed"),
        }
    }
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
    fn load(&self, files: &RepoFiles) -> std::result::Result<(Desired, Vec<Artifact>), model::Diagnostics> {
        model::load(files, &LoadOptions::default()).and_then(|d| render::render_all(&d).map(|a| (d, a)))
    }

    async fn read_files(&self, commit: &str) -> Result<RepoFiles> {
        let mirror = self.mirror.clone();
        let commit = commit.to_string();
        Ok(tokio::task::spawn_blocking(move || mirror.read_files(&commit)).await??)
    }

    /// The secrets this repository names, as values, so a report can never carry one.
    fn secret_values(&self, desired: &Desired) -> Vec<String> {
        let store = self.connect.secrets();
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

    async fn apply(
        &self,
        client: &crate::adapters::proxmox::ProxmoxClient,
        shell: Option<&AnyHostShell>,
        cluster: Option<&ClusterAccess<'_, AnyHostShell>>,
        plan: &Plan,
    ) -> ApplyReport {
        let applier = Applier {
            proxmox: client,
            shell,
            host: self.connect.host_settings(),
            stop: Some(&self.stop),
            cluster: cluster.map(|a| a as &dyn crate::apply::ClusterSteps),
        };
        applier.apply(plan, &mut LogProgress).await
    }

    async fn publish(&self, report: &StatusReport, secrets: &[String]) {
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
        let mirror = self.mirror.clone();
        let url = self.settings.repository.clone();
        let branch = self.settings.status_branch.clone();
        let result = tokio::task::spawn_blocking(move || mirror.publish_status(&url, &branch, &files, &message)).await;
        match result {
            Ok(Ok(commit)) => {
                tracing::info!(%commit, git_ref = %report.git_ref, outcome = report.outcome.as_str(), "status report committed")
            }
            Ok(Err(e)) => {
                self.metrics.record_api_error(ApiSystem::Git);
                tracing::error!(error = %e, "cannot commit the status report");
            }
            Err(e) => tracing::error!(error = %e, "status report task failed"),
        }
    }

    async fn forge_status(&self, sha: &str, state: CommitState, context: &str, description: &str) {
        if let Some(forge) = &self.forge
            && let Err(e) = forge.set_status(sha, state, context, description, None).await
        {
            tracing::warn!(error = %e, "cannot set the commit status on the forge");
        }
    }

    /// Plan (and for the watched branch, apply) one revision, and report it.
    async fn run_revision(&mut self, git_ref: &str, commit: &str, kind: RunKind) {
        let started = now_rfc3339();
        let clock = Instant::now();
        let context = if kind == RunKind::PullRequest {
            "driftless/plan"
        } else {
            "driftless/apply"
        };
        self.forge_status(commit, CommitState::Pending, context, "planning")
            .await;
        let mut report = StatusReport {
            git_ref: git_ref.to_string(),
            revision: commit.to_string(),
            kind,
            outcome: Outcome::Failed,
            started,
            finished: String::new(),
            plan: None,
            applied: None,
            errors: Vec::new(),
            last_attempted_revision: None,
            last_applied_revision: None,
        };
        let mut secrets = Vec::new();
        match self.read_files(commit).await {
            Err(e) => {
                self.metrics.record_api_error(ApiSystem::Git);
                report.errors.push(format!("cannot read revision {commit}: {e:#}"));
            }
            Ok(files) => match self.load(&files) {
                Err(diags) => {
                    report.outcome = Outcome::Invalid;
                    report.errors = diags.0.iter().map(ToString::to_string).collect();
                }
                Ok((desired, artifacts)) => {
                    secrets = self.secret_values(&desired);
                    self.plan_and_maybe_apply(&desired, &artifacts, kind, &mut report).await;
                }
            },
        }
        if kind == RunKind::Reconcile {
            self.memory.last_attempted = Some(commit.to_string());
            match report.outcome {
                Outcome::Applied | Outcome::NoChanges => {
                    self.memory.last_applied = Some(commit.to_string());
                    self.memory.retry = None;
                    self.metrics.set_last_applied(commit);
                }
                Outcome::Failed => {
                    let attempts = self
                        .memory
                        .retry
                        .as_ref()
                        .filter(|(c, _, _)| c == commit)
                        .map_or(0, |r| r.2)
                        + 1;
                    let backoff = Duration::from_secs(5u64.saturating_mul(1 << attempts.min(6)));
                    tracing::warn!(%commit, attempts, retry_in = ?backoff, "reconcile failed; retrying with backoff");
                    self.memory.retry = Some((commit.to_string(), Instant::now() + backoff, attempts));
                }
                _ => self.memory.retry = None,
            }
        }
        report.last_attempted_revision = self.memory.last_attempted.clone();
        report.last_applied_revision = self.memory.last_applied.clone();
        report.finished = now_rfc3339();
        let m_kind = match kind {
            RunKind::Reconcile => ReconcileKind::Reconcile,
            RunKind::PullRequest => ReconcileKind::PullRequest,
            RunKind::Drift => ReconcileKind::Drift,
        };
        let m_outcome = match report.outcome {
            Outcome::Applied | Outcome::Planned | Outcome::DriftFound => metrics::Outcome::Success,
            Outcome::NoChanges | Outcome::NoDrift | Outcome::Suspended => metrics::Outcome::NoChange,
            Outcome::Invalid => metrics::Outcome::Stalled,
            Outcome::Failed => metrics::Outcome::Failure,
        };
        self.metrics.record_reconcile(m_kind, m_outcome, clock.elapsed());
        let state = if report.outcome.is_problem() && report.outcome != Outcome::DriftFound {
            CommitState::Failure
        } else {
            CommitState::Success
        };
        self.forge_status(commit, state, context, report.outcome.explain())
            .await;
        self.publish(&report, &secrets).await;
        super::memory::release_free_memory();
    }

    async fn plan_and_maybe_apply(
        &self,
        desired: &Desired,
        artifacts: &[Artifact],
        kind: RunKind,
        report: &mut StatusReport,
    ) {
        let client = match self.connect.proxmox_client(&desired.cluster) {
            Ok(c) => c,
            Err(e) => {
                report.errors.push(format!("{e:#}"));
                return;
            }
        };
        let shell = match self.connect.host_shell(&desired.cluster) {
            Ok(s) => s,
            Err(e) => {
                report.errors.push(format!("{e:#}"));
                return;
            }
        };
        let access = cluster_access(desired, artifacts, &self.connect, shell.as_ref());
        let plan = match observe_and_plan_all(desired, artifacts, &client, access.as_ref()).await {
            Ok(p) => p,
            Err(e) => {
                self.metrics.record_api_error(ApiSystem::Proxmox);
                report.errors.push(format!("{e:#}"));
                return;
            }
        };
        let drifted = plan.steps.len();
        let suspended = desired.cluster.reconcile.suspend;
        let auto_correct = self
            .settings
            .auto_correct
            .unwrap_or(desired.cluster.reconcile.auto_correct);
        let apply = match kind {
            RunKind::Reconcile => !suspended,
            RunKind::PullRequest => false,
            RunKind::Drift => auto_correct && !suspended,
        };
        report.outcome = match kind {
            RunKind::PullRequest => Outcome::Planned,
            RunKind::Drift if plan.is_empty() => Outcome::NoDrift,
            RunKind::Drift => Outcome::DriftFound,
            RunKind::Reconcile if suspended => Outcome::Suspended,
            RunKind::Reconcile if plan.is_empty() => Outcome::NoChanges,
            RunKind::Reconcile => Outcome::Applied,
        };
        if kind == RunKind::Drift {
            self.metrics.set_drifted_guests(drifted);
        }
        if apply && !plan.is_empty() {
            let applied = self.apply(&client, shell.as_ref(), access.as_ref(), &plan).await;
            if !applied.ok() {
                report.outcome = Outcome::Failed;
                report
                    .errors
                    .extend(applied.done.iter().filter_map(|s| s.error.clone()));
                if applied.stopped {
                    report.errors.push("stopped by shutdown between two steps".into());
                }
            }
            report.applied = Some(applied);
        }
        report.plan = Some(plan);
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
                self.metrics.record_api_error(ApiSystem::Git);
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
            let new = self.memory.last_attempted.as_deref() != Some(commit.as_str());
            let retry_due = self
                .memory
                .retry
                .as_ref()
                .is_some_and(|(c, at, _)| *c == commit && Instant::now() >= *at);
            if new || retry_due {
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
        let Some(commit) = self
            .memory
            .last_applied
            .clone()
            .or_else(|| self.memory.last_attempted.clone())
        else {
            return;
        };
        let watched = branch_ref(&self.settings.branch);
        tracing::info!(%commit, "checking drift");
        self.run_revision(&watched, &commit, RunKind::Drift).await;
    }
}

fn next_drift(settings: &DaemonSettings, cluster_schedule: Option<&str>) -> Option<Instant> {
    if let Some(d) = settings.drift_interval {
        return Some(Instant::now() + d);
    }
    let expr = settings.drift_schedule.as_deref().or(cluster_schedule)?;
    let cron: croner::Cron = expr.parse().ok()?;
    let now = chrono::Utc::now();
    let next = cron.find_next_occurrence(&now, false).ok()?;
    let wait = (next - now).to_std().unwrap_or(Duration::ZERO);
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
pub async fn run(settings: DaemonSettings, connect: ConnectArgs) -> Result<()> {
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
    run_until(settings, connect, control).await
}

/// Run the daemon until `control` asks it to stop.
pub async fn run_until(settings: DaemonSettings, connect: ConnectArgs, control: Control) -> Result<()> {
    std::fs::create_dir_all(&settings.state_dir)
        .with_context(|| format!("cannot create the state directory {}", settings.state_dir.display()))?;
    let auth = GitAuth {
        ssh_key: settings.ssh_key.clone(),
        known_hosts: settings.known_hosts.clone(),
        token_file: settings.token_file.clone(),
    };
    let mirror = {
        let (url, dir) = (settings.repository.clone(), settings.state_dir.join("mirror"));
        tokio::task::spawn_blocking(move || Mirror::open_or_init(&url, &dir, auth)).await??
    };
    let forge = match &settings.forge {
        None => None,
        Some((kind, api, repo, token_file)) => {
            let token =
                std::fs::read_to_string(token_file).with_context(|| format!("cannot read {}", token_file.display()))?;
            Some(ForgeClient::new(
                *kind,
                api.clone(),
                repo.clone(),
                token.trim().to_string(),
            )?)
        }
    };
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
        connect,
        mirror: Arc::new(mirror),
        metrics,
        stop: stop.clone(),
        forge,
        memory: Memory::default(),
    };
    let interval_default = Duration::from_secs(60);
    let mut drift_at: Option<Instant> = None;
    let mut cluster_interval: Option<Duration> = None;
    let mut cluster_schedule: Option<String> = None;
    tracing::info!(repository = %super::gitops::display_url(&daemon.settings.repository), branch = %daemon.settings.branch, "daemon started");
    loop {
        daemon.poll(&ready).await;
        if stop.load(Ordering::SeqCst) {
            break;
        }
        // The repository's own policy: read from the last attempted revision.
        if let Some(commit) = daemon.memory.last_attempted.clone()
            && let Ok(files) = daemon.read_files(&commit).await
            && let Ok(d) = model::load(&files, &LoadOptions::default())
        {
            cluster_interval = model::parse_duration(&d.cluster.reconcile.interval).map(Duration::from_secs);
            cluster_schedule = Some(d.cluster.reconcile.drift_schedule.clone());
        }
        if drift_at.is_none() {
            drift_at = next_drift(&daemon.settings, cluster_schedule.as_deref());
        }
        let interval = daemon
            .settings
            .poll_interval
            .or(cluster_interval)
            .unwrap_or(interval_default);
        let mut poll_at = Instant::now() + interval + jitter(interval);
        if let Some((_, at, _)) = &daemon.memory.retry {
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
