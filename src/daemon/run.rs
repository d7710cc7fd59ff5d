//! The daemon loop: fetch the watched branch on an interval (with jitter), at once on a signed
//! webhook or a change of a local repository; reconcile each new revision, plan pull request
//! refs without applying, check drift on a schedule, and commit a status report after every
//! run. The watched branch's runs go one at a time; pull request plans run on a lane of their
//! own beside them, so a slow or hostile one never delays the branch. A shutdown stops an
//! apply between two steps.

use super::config::DaemonSettings;
use super::decide::{self, Retry, Revisions};
use super::git::{Mirror, glob_match};
use super::leader::{self, Leadership};
use super::metrics::{self, Metrics, ReconcileKind};
use super::server::{self, ServerState, Trigger};
use super::status::{Outcome, RunKind};
use super::worker::{self, RunJob, RunResult, Schedule};
use crate::ports::System;
use crate::settings::RunSettings;
use anyhow::{Context, Result};
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;

/// What the daemon remembers between runs.
#[derive(Debug, Default)]
struct Memory {
    /// Kept across restarts (`Remembered`).
    kept: Remembered,
    /// The failed revision and when to try it again (backoff); an invalid revision is never
    /// retried: it stalls until a new commit.
    retry: Option<(Retry, Instant)>,
    /// The schedule of the last revision that loaded.
    schedule: Option<Schedule>,
}

/// What survives a restart of the daemon, in `STATE/daemon-memory.json`: the revisions (so a
/// restarted daemon neither re-applies nor forgets what was applied, and pull requests keep
/// their trusted revision) and the pull request commits already planned (so a hostile pull
/// request is not planned again at every restart).
#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
struct Remembered {
    revisions: Revisions,
    planned: BTreeMap<String, String>,
}

const MEMORY_FILE: &str = "daemon-memory.json";

impl Remembered {
    fn load(state_dir: &std::path::Path) -> Remembered {
        std::fs::read(state_dir.join(MEMORY_FILE))
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default()
    }

    /// Written to a temporary file and renamed: a crash leaves the old or the new memory.
    fn save(&self, state_dir: &std::path::Path) {
        let write = || -> std::io::Result<()> {
            let mut tmp = tempfile::NamedTempFile::new_in(state_dir)?;
            serde_json::to_writer(&mut tmp, self)?;
            tmp.as_file().sync_all()?;
            tmp.persist(state_dir.join(MEMORY_FILE)).map_err(|e| e.error)?;
            Ok(())
        };
        if let Err(e) = write() {
            tracing::warn!(error = %e, "cannot save the daemon's memory");
        }
    }
}

/// What the loop needs from the world: the refs of the repository and one run of a job. The
/// daemon fetches into its mirror and starts a worker process ([`Processes`]); the loop's
/// tests script both.
pub trait Backend: Clone + Send + Sync + 'static {
    /// Fetch `refspecs`; the refs the mirror then holds, name -> commit.
    fn fetch(&mut self, refspecs: Vec<String>)
    -> impl Future<Output = Result<BTreeMap<String, String>, String>> + Send;
    /// Run `job` to its end. A run that gave no answer is reported failed by the backend.
    fn run(&mut self, job: &RunJob, stop: &AtomicBool) -> impl Future<Output = RunResult> + Send;
    /// A number that differs between daemons, to spread their polls.
    fn jitter_seed(&self) -> u32;
    /// Push the status reports that could not be pushed before.
    fn flush_reports(&mut self) -> impl Future<Output = ()> + Send {
        async {}
    }
}

/// The real backend: a gix mirror of the repository, and a worker process per run.
#[derive(Clone)]
pub struct Processes {
    mirror: Arc<Mirror>,
    settings: DaemonSettings,
}

impl Backend for Processes {
    async fn fetch(&mut self, refspecs: Vec<String>) -> Result<BTreeMap<String, String>, String> {
        let mirror = self.mirror.clone();
        match tokio::task::spawn_blocking(move || mirror.fetch_healing(&refspecs)).await {
            Ok(Ok((refs, remade))) => {
                if remade {
                    tracing::warn!("the mirror was damaged and has been fetched again from scratch");
                }
                Ok(refs)
            }
            Ok(Err(e)) => Err(e.to_string()),
            Err(e) => Err(format!("fetch task failed: {e}")),
        }
    }

    async fn flush_reports(&mut self) {
        let (mirror, settings) = (self.mirror.clone(), self.settings.clone());
        let _ = tokio::task::spawn_blocking(move || worker::flush_queued_reports(&mirror, &settings)).await;
    }

    async fn run(&mut self, job: &RunJob, stop: &AtomicBool) -> RunResult {
        match worker::run_in_worker(job, stop).await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(commit = %job.commit, git_ref = %job.git_ref, error = %e, "the run failed without a report");
                self.report_lost_run(job, &e).await
            }
        }
    }

    /// The clock's nanoseconds: enough to spread many daemons' polls.
    fn jitter_seed(&self) -> u32 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|t| t.subsec_nanos())
            .unwrap_or(0)
    }
}

impl Processes {
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
}

/// The daemon's loop state: its settings, what it remembers, and the backend it runs on.
pub struct Daemon<B: Backend> {
    settings: DaemonSettings,
    run: RunSettings,
    backend: B,
    metrics: Arc<Metrics>,
    stop: Arc<AtomicBool>,
    memory: Memory,
    /// With leader election: runs start only while this replica leads.
    leadership: Option<Arc<Leadership>>,
}

/// The branch's full ref name.
fn branch_ref(branch: &str) -> String {
    if branch.starts_with("refs/") {
        branch.to_string()
    } else {
        format!("refs/heads/{branch}")
    }
}

impl<B: Backend> Daemon<B> {
    pub fn new(
        settings: DaemonSettings,
        run: RunSettings,
        backend: B,
        metrics: Arc<Metrics>,
        stop: Arc<AtomicBool>,
    ) -> Self {
        let kept = Remembered::load(&settings.state_dir);
        Daemon {
            settings,
            run,
            backend,
            metrics,
            stop,
            memory: Memory {
                kept,
                ..Memory::default()
            },
            leadership: None,
        }
    }

    /// One replica among several: fetch always, but reconcile, plan, check drift and push
    /// reports only while `leadership` says this one leads.
    pub fn with_leadership(mut self, leadership: Arc<Leadership>) -> Self {
        self.leadership = Some(leadership);
        self
    }

    fn leading(&self) -> bool {
        self.leadership.as_ref().is_none_or(|l| l.is_leader())
    }

    fn job(&self, git_ref: &str, commit: &str, kind: RunKind) -> RunJob {
        RunJob {
            settings: self.settings.clone(),
            run: self.run.clone(),
            git_ref: git_ref.to_string(),
            commit: commit.to_string(),
            kind,
            revisions: self.memory.kept.revisions.clone(),
        }
    }

    /// Run one revision (in a worker process, see `worker`), then keep what it tells.
    async fn run_revision(&mut self, git_ref: &str, commit: &str, kind: RunKind) {
        let clock = Instant::now();
        let job = self.job(git_ref, commit, kind);
        let result = match self.leadership.clone() {
            None => self.backend.run(&job, &self.stop).await,
            // A replica that stops leading stops its run between two steps: the next leader
            // must not apply beside it.
            Some(l) => {
                let run_stop = AtomicBool::new(false);
                tokio::select! {
                    r = self.backend.run(&job, &run_stop) => r,
                    () = l.stop_run_unless_leading(&self.stop, &run_stop) => unreachable!("never completes"),
                }
            }
        };
        record(&self.metrics, kind, &result, clock.elapsed());
        if let Some(schedule) = &result.schedule {
            self.memory.schedule = Some(schedule.clone());
        }
        if kind == RunKind::Reconcile {
            self.memory.kept.revisions = self.memory.kept.revisions.after(kind, commit, result.outcome);
            self.memory.kept.save(&self.settings.state_dir);
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
        super::memory::release_free_memory();
    }

    /// Fetch, then run what is new: the watched branch here, pull request refs on their
    /// own lane (`plans`).
    async fn poll(&mut self, ready: &AtomicBool, plans: &mpsc::Sender<RunJob>) {
        let mut specs = vec![format!(
            "+{}:{}",
            branch_ref(&self.settings.branch),
            branch_ref(&self.settings.branch)
        )];
        for p in &self.settings.plan_refs {
            specs.push(format!("+{p}:{p}"));
        }
        let refs = match self.backend.fetch(specs).await {
            Ok(r) => r,
            Err(e) => {
                self.metrics.record_api_error(System::Git);
                tracing::error!(error = %e, "fetch failed");
                // Not ready while the repository cannot be fetched: /readyz says so.
                ready.store(false, Ordering::Release);
                return;
            }
        };
        ready.store(true, Ordering::Release);
        if !self.leading() {
            // A follower keeps its mirror warm; the leader runs, plans and reports.
            return;
        }
        self.backend.flush_reports().await;
        let watched = branch_ref(&self.settings.branch);
        if let Some(commit) = refs.get(&watched).cloned() {
            let retry_due = self
                .memory
                .retry
                .as_ref()
                .filter(|(_, at)| Instant::now() >= *at)
                .map(|(r, _)| r.commit.as_str());
            if decide::reconcile_due(&self.memory.kept.revisions, retry_due, &commit) {
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
            if self.memory.kept.planned.get(&name) != Some(&commit) {
                // Queued, not awaited: a slow or hostile pull request never delays the
                // watched branch. A full queue leaves the ref for the next poll.
                let job = self.job(&name, &commit, RunKind::PullRequest);
                if plans.try_send(job).is_ok() {
                    tracing::info!(%commit, git_ref = %name, "planning a pull request ref");
                    self.memory.kept.planned.insert(name, commit);
                    self.memory.kept.save(&self.settings.state_dir);
                }
            }
        }
    }

    async fn drift(&mut self) {
        if !self.leading() {
            return;
        }
        let revisions = &self.memory.kept.revisions;
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

/// Count a finished run in the metrics.
fn record(metrics: &Metrics, kind: RunKind, result: &RunResult, took: Duration) {
    for system in &result.api_errors {
        metrics.record_api_error(*system);
    }
    if let Some(drifted) = result.drifted {
        metrics.set_drifted_guests(drifted);
    }
    let m_kind = match kind {
        RunKind::Reconcile => ReconcileKind::Reconcile,
        RunKind::PullRequest => ReconcileKind::PullRequest,
        RunKind::Drift => ReconcileKind::Drift,
    };
    let m_outcome = match result.outcome {
        Outcome::Applied | Outcome::Planned | Outcome::DriftFound => metrics::Outcome::Success,
        Outcome::NoChanges | Outcome::NoDrift | Outcome::Suspended => metrics::Outcome::NoChange,
        Outcome::Invalid | Outcome::Unverified => metrics::Outcome::Stalled,
        Outcome::Failed => metrics::Outcome::Failure,
    };
    metrics.record_reconcile(m_kind, m_outcome, took);
}

/// How many pull request plans may wait for the plan lane.
const PLAN_QUEUE: usize = 64;

/// The lane pull request plans run on: one at a time, beside the watched branch's runs.
fn plan_lane<B: Backend>(
    mut backend: B,
    metrics: Arc<Metrics>,
    stop: Arc<AtomicBool>,
) -> (mpsc::Sender<RunJob>, tokio::task::JoinHandle<()>) {
    let (tx, mut rx) = mpsc::channel::<RunJob>(PLAN_QUEUE);
    let task = tokio::spawn(async move {
        while let Some(job) = rx.recv().await {
            if stop.load(Ordering::SeqCst) {
                break;
            }
            let clock = Instant::now();
            let result = backend.run(&job, &stop).await;
            record(&metrics, job.kind, &result, clock.elapsed());
            super::memory::release_free_memory();
        }
    });
    (tx, task)
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
    // The hard limit (systemd's LimitNOFILE), not the soft 1024: clients of the HTTP server must
    // never leave the daemon's own fetches without descriptors.
    match server::raise_open_files_limit() {
        Ok(limit) => tracing::debug!(limit, "open files limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open files limit"),
    }
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
    // Likewise an unreadable allowed-signers file or key (each run reads them again).
    if let Some(verify) = &settings.verify {
        super::verify::Policy::load(verify)?;
    }
    let metrics = Arc::new(Metrics::new());
    // With leader election, checked at start too: a kubeconfig that cannot be read is an error
    // now, not a replica that follows for ever.
    let election = match &settings.leader_election {
        None => {
            metrics.set_leader(true);
            None
        }
        Some(election) => {
            let (client, namespace) = leader::client(election).await?;
            Some((election.clone(), client, namespace, Leadership::new(&election.identity)))
        }
    };
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
        leadership: election.as_ref().map(|(.., l)| l.clone()),
    };
    let server_shutdown = shutdown.clone();
    let server = tokio::spawn(async move {
        server::serve(listener, server_state, async move { server_shutdown.notified().await }).await
    });

    // A local repository is watched: a commit there is noticed at once.
    let (watch_tx, mut watch_rx) = mpsc::channel::<()>(1);
    let _watcher = watch_local(&settings.repository, watch_tx);

    let backend = Processes {
        mirror: Arc::new(mirror),
        settings: settings.clone(),
    };
    let mut daemon = Daemon::new(settings, run, backend, metrics.clone(), stop.clone());
    // The election runs until the loop below has ended (its last run over), then releases the
    // Lease.
    let (loop_done, done) = tokio::sync::watch::channel(false);
    let election = match election {
        None => None,
        Some((election, client, namespace, leadership)) => {
            daemon = daemon.with_leadership(leadership.clone());
            Some(tokio::spawn(leader::run(
                election, client, namespace, leadership, metrics, done,
            )))
        }
    };
    tracing::info!(repository = %super::git::display_url(&daemon.settings.repository), branch = %daemon.settings.branch, "daemon started");
    daemon.run_loop(&ready, &mut trigger_rx, &mut watch_rx, &shutdown).await;
    let _ = loop_done.send(true);
    if let Some(election) = election {
        let _ = election.await;
    }
    shutdown.notify_waiters();
    let _ = server.await;
    tracing::info!("daemon stopped");
    Ok(())
}

impl<B: Backend> Daemon<B> {
    /// Poll, run what is due, wait for the next poll, webhook, local change or drift check;
    /// until a stop is requested.
    pub async fn run_loop(
        &mut self,
        ready: &AtomicBool,
        triggers: &mut mpsc::Receiver<Trigger>,
        local_changes: &mut mpsc::Receiver<()>,
        shutdown: &Notify,
    ) {
        let mut drift_at: Option<Instant> = None;
        let (plans, plan_task) = plan_lane(self.backend.clone(), self.metrics.clone(), self.stop.clone());
        let mut roles = self.leadership.as_ref().map(|l| l.subscribe());
        loop {
            self.poll(ready, &plans).await;
            if self.stop.load(Ordering::SeqCst) {
                break;
            }
            // The repository's own schedule, as the last run that loaded it reported.
            let cluster_interval = self.memory.schedule.as_ref().and_then(|p| p.interval);
            let cluster_schedule = self.memory.schedule.as_ref().map(|p| p.drift_schedule.clone());
            if drift_at.is_none() {
                drift_at = next_drift(&self.settings, cluster_schedule.as_deref());
            }
            let interval = decide::poll_interval(self.settings.poll_interval, cluster_interval);
            let mut poll_at = Instant::now() + interval + decide::jitter(interval, self.backend.jitter_seed());
            if let Some((_, at)) = &self.memory.retry {
                poll_at = poll_at.min(*at);
            }
            let drift_sleep = async {
                match drift_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            // A replica that starts leading polls at once: it may have a commit to apply.
            let role_changed = async {
                match roles.as_mut() {
                    Some(r) => r.changed().await.is_ok(),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = tokio::time::sleep_until(poll_at) => {}
                true = role_changed => {}
                Some(t) = triggers.recv() => tracing::info!(trigger = ?t, "webhook: fetching now"),
                Some(()) = local_changes.recv() => tracing::info!("local repository changed: fetching now"),
                _ = drift_sleep => {
                    self.drift().await;
                    drift_at = next_drift(&self.settings, cluster_schedule.as_deref());
                }
                _ = shutdown.notified() => {}
            }
            if self.stop.load(Ordering::SeqCst) {
                break;
            }
        }
        // A plan under way gets the shutdown too (SIGTERM to its worker); wait for it.
        drop(plans);
        let _ = plan_task.await;
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::config::DaemonFlags;
    use crate::daemon::webhook::Forge;
    use std::collections::VecDeque;
    use std::sync::Mutex;
    use std::time::Duration;

    /// One run the loop started: seconds since the start, what kind, which commit.
    type Runs = Arc<Mutex<Vec<(u64, RunKind, String)>>>;

    /// A repository whose refs the test sets, and runs whose outcomes it scripts.
    #[derive(Clone)]
    struct Script {
        refs: Arc<Mutex<BTreeMap<String, String>>>,
        reconcile_outcomes: Arc<Mutex<VecDeque<Outcome>>>,
        /// How long a pull request plan takes.
        plan_takes: Duration,
        runs: Runs,
        fetches: Arc<Mutex<Vec<u64>>>,
        fetch_fails: Arc<AtomicBool>,
        start: Instant,
    }

    impl Backend for Script {
        async fn fetch(&mut self, _: Vec<String>) -> Result<BTreeMap<String, String>, String> {
            self.fetches.lock().unwrap().push(self.start.elapsed().as_secs());
            if self.fetch_fails.load(Ordering::SeqCst) {
                return Err("the remote is gone".into());
            }
            Ok(self.refs.lock().unwrap().clone())
        }

        async fn run(&mut self, job: &RunJob, _: &AtomicBool) -> RunResult {
            let at = self.start.elapsed().as_secs();
            self.runs.lock().unwrap().push((at, job.kind, job.commit.clone()));
            let outcome = match job.kind {
                RunKind::Reconcile => self
                    .reconcile_outcomes
                    .lock()
                    .unwrap()
                    .pop_front()
                    .unwrap_or(Outcome::Applied),
                RunKind::PullRequest => {
                    tokio::time::sleep(self.plan_takes).await;
                    Outcome::Planned
                }
                RunKind::Drift => Outcome::NoDrift,
            };
            RunResult {
                outcome,
                drifted: None,
                api_errors: Vec::new(),
                schedule: None,
            }
        }

        fn jitter_seed(&self) -> u32 {
            0
        }
    }

    struct Harness {
        _state: tempfile::TempDir,
        refs: Arc<Mutex<BTreeMap<String, String>>>,
        runs: Runs,
        fetches: Arc<Mutex<Vec<u64>>>,
        fetch_fails: Arc<AtomicBool>,
        ready: Arc<AtomicBool>,
        triggers: mpsc::Sender<Trigger>,
        control: Control,
        task: tokio::task::JoinHandle<()>,
    }

    /// Start the loop on a scripted backend, the watched branch at `head`.
    fn start(flags: DaemonFlags, head: &str, reconcile_outcomes: &[Outcome]) -> Harness {
        start_in(
            tempfile::tempdir().unwrap(),
            flags,
            head,
            reconcile_outcomes,
            Duration::ZERO,
        )
    }

    fn start_in(
        state: tempfile::TempDir,
        flags: DaemonFlags,
        head: &str,
        reconcile_outcomes: &[Outcome],
        plan_takes: Duration,
    ) -> Harness {
        start_with(state, flags, head, reconcile_outcomes, plan_takes, None)
    }

    fn start_with(
        state: tempfile::TempDir,
        flags: DaemonFlags,
        head: &str,
        reconcile_outcomes: &[Outcome],
        plan_takes: Duration,
        leadership: Option<Arc<Leadership>>,
    ) -> Harness {
        let settings = DaemonFlags {
            repository: Some("file:///srv/homelab.git".into()),
            plan_refs: vec!["refs/pull/*/head".into()],
            state_dir: Some(state.path().to_path_buf()),
            ..flags
        }
        .resolve()
        .unwrap();
        let refs = Arc::new(Mutex::new(BTreeMap::from([(
            "refs/heads/main".to_string(),
            head.to_string(),
        )])));
        let runs: Runs = Arc::default();
        let fetches = Arc::new(Mutex::new(Vec::new()));
        let fetch_fails = Arc::new(AtomicBool::new(false));
        let ready = Arc::new(AtomicBool::new(false));
        let backend = Script {
            refs: refs.clone(),
            reconcile_outcomes: Arc::new(Mutex::new(reconcile_outcomes.iter().copied().collect())),
            plan_takes,
            runs: runs.clone(),
            fetches: fetches.clone(),
            fetch_fails: fetch_fails.clone(),
            start: Instant::now(),
        };
        let control = Control::default();
        let (triggers, mut trigger_rx) = mpsc::channel(1);
        let (_watch_tx, mut watch_rx) = mpsc::channel(1);
        let mut daemon = Daemon::new(
            settings,
            RunSettings::default(),
            backend,
            Arc::new(Metrics::new()),
            control.stop.clone(),
        );
        if let Some(l) = leadership {
            daemon = daemon.with_leadership(l);
        }
        let shutdown = control.shutdown.clone();
        let loop_ready = ready.clone();
        let task = tokio::spawn(async move {
            let _keep = _watch_tx;
            daemon
                .run_loop(&loop_ready, &mut trigger_rx, &mut watch_rx, &shutdown)
                .await;
        });
        Harness {
            _state: state,
            refs,
            runs,
            fetches,
            fetch_fails,
            ready,
            triggers,
            control,
            task,
        }
    }

    impl Harness {
        async fn stop(self) -> (Vec<(u64, RunKind, String)>, Vec<u64>) {
            self.stop_keeping_state().await.0
        }

        /// Stop, and keep the state directory for a daemon started after this one.
        async fn stop_keeping_state(self) -> ((Vec<(u64, RunKind, String)>, Vec<u64>), tempfile::TempDir) {
            self.control.request_stop();
            self.task.await.unwrap();
            let runs = self.runs.lock().unwrap().clone();
            let fetches = self.fetches.lock().unwrap().clone();
            ((runs, fetches), self._state)
        }
    }

    fn run(at: u64, kind: RunKind, commit: &str) -> (u64, RunKind, String) {
        (at, kind, commit.to_string())
    }

    #[tokio::test(start_paused = true)]
    async fn ready_only_while_the_repository_can_be_fetched() {
        let h = start(
            DaemonFlags {
                poll_interval: Some("60s".into()),
                ..DaemonFlags::default()
            },
            "c1",
            &[],
        );
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(h.ready.load(Ordering::SeqCst), "ready after the first fetch");
        h.fetch_fails.store(true, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(70)).await;
        assert!(!h.ready.load(Ordering::SeqCst), "not ready while fetches fail");
        h.fetch_fails.store(false, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(70)).await;
        assert!(h.ready.load(Ordering::SeqCst), "ready again");
        h.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_revision_is_retried_with_backoff_and_drift_runs_on_its_interval() {
        let h = start(
            DaemonFlags {
                poll_interval: Some("60s".into()),
                drift_interval: Some("45s".into()),
                ..DaemonFlags::default()
            },
            "c1",
            &[Outcome::Failed, Outcome::Failed, Outcome::Applied],
        );
        tokio::time::sleep(Duration::from_secs(100)).await;
        let (runs, fetches) = h.stop().await;
        assert_eq!(
            runs,
            [
                run(0, RunKind::Reconcile, "c1"),
                // Backoff: 10 s after the first failure, 20 s after the second.
                run(10, RunKind::Reconcile, "c1"),
                run(30, RunKind::Reconcile, "c1"),
                // Drift every 45 s, on the revision last applied.
                run(45, RunKind::Drift, "c1"),
                run(90, RunKind::Drift, "c1"),
            ]
        );
        // Polls: at start, at each retry, after each drift check, and on the interval.
        assert_eq!(fetches, [0, 10, 30, 45, 90]);
    }

    #[tokio::test(start_paused = true)]
    async fn an_applied_revision_is_not_run_again_and_a_webhook_brings_the_next_at_once() {
        let h = start(
            DaemonFlags {
                poll_interval: Some("60s".into()),
                ..DaemonFlags::default()
            },
            "c1",
            &[],
        );
        tokio::time::sleep(Duration::from_secs(130)).await;
        h.refs.lock().unwrap().insert("refs/heads/main".into(), "c2".into());
        h.refs.lock().unwrap().insert("refs/pull/7/head".into(), "p1".into());
        h.triggers
            .send(Trigger::Webhook {
                forge: Forge::GitHub,
                git_ref: None,
            })
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_secs(70)).await;
        let (runs, fetches) = h.stop().await;
        assert_eq!(
            runs,
            [
                run(0, RunKind::Reconcile, "c1"),
                run(130, RunKind::Reconcile, "c2"),
                run(130, RunKind::PullRequest, "p1"),
            ],
            "polls at 60 and 120 s find nothing new; the webhook at 130 s fetches at once"
        );
        assert_eq!(fetches, [0, 60, 120, 130, 190]);
    }

    #[tokio::test(start_paused = true)]
    async fn an_invalid_revision_stalls_until_a_new_commit() {
        let h = start(
            DaemonFlags {
                poll_interval: Some("30s".into()),
                ..DaemonFlags::default()
            },
            "bad",
            &[Outcome::Invalid],
        );
        tokio::time::sleep(Duration::from_secs(100)).await;
        let (runs, fetches) = h.stop().await;
        assert_eq!(runs, [run(0, RunKind::Reconcile, "bad")]);
        assert_eq!(fetches, [0, 30, 60, 90]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_pull_request_plan_that_hangs_never_delays_the_watched_branch() {
        let h = start_in(
            tempfile::tempdir().unwrap(),
            DaemonFlags {
                poll_interval: Some("60s".into()),
                ..DaemonFlags::default()
            },
            "c1",
            &[],
            Duration::from_secs(10_000),
        );
        h.refs
            .lock()
            .unwrap()
            .insert("refs/pull/9/head".into(), "hostile".into());
        tokio::time::sleep(Duration::from_secs(30)).await;
        h.refs.lock().unwrap().insert("refs/heads/main".into(), "c2".into());
        tokio::time::sleep(Duration::from_secs(100)).await;
        let runs = h.runs.lock().unwrap().clone();
        assert_eq!(
            runs,
            [
                run(0, RunKind::Reconcile, "c1"),
                run(0, RunKind::PullRequest, "hostile"),
                run(60, RunKind::Reconcile, "c2"),
            ],
            "the watched branch is reconciled on its interval while the plan runs"
        );
        h.control.request_stop();
    }

    #[tokio::test(start_paused = true)]
    async fn a_restarted_daemon_remembers_what_it_applied_and_planned() {
        let flags = || DaemonFlags {
            poll_interval: Some("60s".into()),
            ..DaemonFlags::default()
        };
        let first = start(flags(), "c1", &[]);
        first
            .refs
            .lock()
            .unwrap()
            .insert("refs/pull/3/head".into(), "p1".into());
        tokio::time::sleep(Duration::from_secs(10)).await;
        let ((runs, _), state) = first.stop_keeping_state().await;
        assert_eq!(
            runs,
            [run(0, RunKind::Reconcile, "c1"), run(0, RunKind::PullRequest, "p1")]
        );

        let second = start_in(state, flags(), "c1", &[], Duration::ZERO);
        second
            .refs
            .lock()
            .unwrap()
            .insert("refs/pull/3/head".into(), "p1".into());
        tokio::time::sleep(Duration::from_secs(10)).await;
        let (runs, fetches) = second.stop().await;
        assert_eq!(runs, [], "neither c1 nor the pull request is run again");
        assert_eq!(fetches, [0]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_follower_fetches_but_runs_nothing_and_starts_at_once_when_it_leads() {
        let leadership = Leadership::new("replica-b");
        let h = start_with(
            tempfile::tempdir().unwrap(),
            DaemonFlags {
                poll_interval: Some("60s".into()),
                drift_interval: Some("30s".into()),
                ..DaemonFlags::default()
            },
            "c1",
            &[],
            Duration::ZERO,
            Some(leadership.clone()),
        );
        h.refs.lock().unwrap().insert("refs/pull/4/head".into(), "p1".into());
        tokio::time::sleep(Duration::from_secs(100)).await;
        assert_eq!(
            *h.runs.lock().unwrap(),
            [],
            "a follower neither applies, plans nor checks drift"
        );
        assert!(h.ready.load(Ordering::SeqCst), "a follower is ready: it fetches");
        leadership.set(leader::Role::Leader);
        tokio::time::sleep(Duration::from_secs(1)).await;
        let runs = h.runs.lock().unwrap().clone();
        assert_eq!(
            runs,
            [run(100, RunKind::Reconcile, "c1"), run(100, RunKind::PullRequest, "p1")],
            "the new leader polls at once, without waiting for its interval"
        );
        let (_, fetches) = h.stop().await;
        // Fetches on the interval and after each drift tick, which a follower skips.
        assert_eq!(fetches, [0, 30, 60, 90, 100]);
    }
}
