//! Observe and apply: the effectful half of planning. `observe` reads Proxmox (one listing,
//! one config read per guest driftless may touch); `apply` runs a plan's steps as plan::schedule
//! allows (independent steps side by side, up to the parallelism bound), waits for every task,
//! and after the first failure starts no new step, reporting what was done, what failed and
//! what was not started. A digest conflict re-reads and re-plans that guest, never overwrites.

use crate::cluster::access::ClusterError;
use crate::hostshell::{self, HostShellError};
use crate::plan::{Action, Change, DesiredGuest, Observed, Plan, Step, Via, diff_guest, normalize_tags, schedule};
use crate::ports::{HostShell, PowerAction, ProxmoxApi, ProxmoxError, PveKind, ShellError, System};
use crate::settings::HostShellSettings;
use futures_util::StreamExt;
use futures_util::future::join_all;
use futures_util::stream::FuturesUnordered;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Proxmox(#[from] ProxmoxError),
    #[error(transparent)]
    Shell(#[from] ShellError),
    #[error(transparent)]
    HostShell(#[from] HostShellError),
    #[error("this step needs the Proxmox host shell, and none is configured (proxmox.hosts in cluster.yaml)")]
    NoHostShell,
    #[error("the config of vmid {vmid} kept changing while driftless updated it ({attempts} attempts)")]
    KeptChanging { vmid: u32, attempts: u32 },
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error("this is a cluster step and the cluster layer is not set up for this run")]
    NoClusterLayer,
}

impl ApplyError {
    /// The system this failure is blamed on.
    pub fn system(&self) -> System {
        match self {
            ApplyError::Proxmox(_) | ApplyError::KeptChanging { .. } => System::Proxmox,
            ApplyError::Shell(_) | ApplyError::HostShell(_) => System::Ssh,
            ApplyError::NoHostShell | ApplyError::NoClusterLayer => System::Repository,
            ApplyError::Cluster(e) => e.system(),
        }
    }

    /// Whether another attempt (the daemon's retry, the next apply) can succeed.
    pub fn retryable(&self) -> bool {
        match self {
            ApplyError::Proxmox(e) => e.retryable(),
            ApplyError::Shell(e) => e.retryable(),
            ApplyError::HostShell(e) => e.retryable(),
            ApplyError::KeptChanging { .. } => true,
            ApplyError::Cluster(e) => e.retryable(),
            ApplyError::NoHostShell | ApplyError::NoClusterLayer => false,
        }
    }
}

/// The boxed future a [`ClusterSteps`] method returns (the trait is used as `dyn`).
pub type StepFuture<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), ClusterError>> + Send + 'a>>;

/// Runs the cluster layer's steps (K3s on the node, Talos API, Kubernetes API) and the
/// health gates; implemented by `cluster::ClusterAccess`. Errors never carry a secret.
pub trait ClusterSteps: Send + Sync {
    fn run<'a>(&'a self, step: &'a Step, log: &'a mut Vec<String>) -> StepFuture<'a>;
    /// After a guest step that interrupted a node (restart, start): wait until it is Ready
    /// again when it is a cluster member.
    fn after_guest_step<'a>(&'a self, step: &'a Step, log: &'a mut Vec<String>) -> StepFuture<'a>;
}

/// Read what driftless needs from Proxmox for `guests`: the listing, and the config of each
/// guest that is a node's vmid (tagged orphans need no config to be pruned).
pub async fn observe<P: ProxmoxApi>(proxmox: &P, guests: &[DesiredGuest]) -> Result<Observed, ProxmoxError> {
    let listing = proxmox.list_guests().await?;
    let wanted: BTreeMap<u32, &DesiredGuest> = guests.iter().map(|g| (g.vmid, g)).collect();
    // Only guests driftless may act on: a node's vmid (same kind and node: else it's a
    // conflict and nothing is read) or, for prune, tagged ones (no config needed to delete).
    let to_read: Vec<_> = listing
        .iter()
        .filter(|g| {
            wanted
                .get(&g.vmid)
                .is_some_and(|w| w.kind == g.kind && w.pve_node == g.node)
        })
        .collect();
    let reads = join_all(
        to_read
            .iter()
            .map(|g| async move { (g.vmid, proxmox.read_config(&g.node, g.kind, g.vmid).await) }),
    )
    .await;
    let mut configs = BTreeMap::new();
    for (vmid, r) in reads {
        configs.insert(vmid, r?);
    }
    Ok(Observed {
        guests: listing,
        configs,
    })
}

#[derive(Debug, Clone, Serialize)]
pub struct StepOutcome {
    /// The step's place in the plan.
    #[serde(skip)]
    pub index: usize,
    pub node: String,
    pub vmid: u32,
    pub action: &'static str,
    pub ok: bool,
    /// How long the step took, gates included.
    pub duration_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The system a failed step is blamed on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failed_system: Option<System>,
    /// What happened, in order: "created (task UPID:...)", "raw lxc keys written", ...
    pub log: Vec<String>,
}

/// The result of one apply: each step attempted (in the order they ended), and the steps
/// never started (in plan order).
#[derive(Debug, Clone, Serialize, Default)]
pub struct ApplyReport {
    pub done: Vec<StepOutcome>,
    pub not_done: Vec<String>,
    /// A shutdown stopped the apply between two steps.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub stopped: bool,
    /// Proxmox API calls retried during the apply (the API unreachable or answering 5xx).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub api_retries: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl ApplyReport {
    pub fn ok(&self) -> bool {
        self.done.iter().all(|s| s.ok) && !self.stopped
    }
}

/// Progress events for people watching a long apply. With several steps running at once, a
/// step's start and its end are separate events; `index` is the step's place in the plan.
pub trait Progress {
    fn step_started(&mut self, index: usize, total: usize, step: &Step);
    fn step_finished(&mut self, outcome: &StepOutcome);
}

impl Progress for () {
    fn step_started(&mut self, _: usize, _: usize, _: &Step) {}
    fn step_finished(&mut self, _: &StepOutcome) {}
}

pub struct Applier<'a, P: ProxmoxApi, H: HostShell> {
    pub proxmox: &'a P,
    pub shell: Option<&'a H>,
    /// Where /etc/pve and `pct` are on the host.
    pub host: &'a HostShellSettings,
    /// Set by a shutdown: the apply stops between steps, never inside one.
    pub stop: Option<&'a std::sync::atomic::AtomicBool>,
    /// The cluster layer; `None` applies guest steps only (a plan made without it has no
    /// cluster steps).
    pub cluster: Option<&'a dyn ClusterSteps>,
    /// At most this many steps run at once on one Proxmox node; 1 runs one step at a time,
    /// in plan order.
    pub parallelism: usize,
    /// The control-plane nodes, whose cluster steps come first (`plan::schedule`).
    pub control_plane: BTreeSet<String>,
}

impl<P: ProxmoxApi, H: HostShell> Applier<'_, P, H> {
    /// Run the plan's steps, each as soon as the steps it depends on are done
    /// (`plan::schedule`) and a slot on its Proxmox node is free. The first failure stops new
    /// steps from starting; steps already running finish; so does a stop request.
    pub async fn apply(&self, plan: &Plan, progress: &mut (dyn Progress + Send)) -> ApplyReport {
        #[derive(Clone, Copy, PartialEq)]
        enum State {
            Waiting,
            Running,
            Done,
        }
        let steps = &plan.steps;
        let total = steps.len();
        let after = schedule::dependencies(steps, &self.control_plane);
        let per_node = self.parallelism.max(1);
        let overall = if per_node == 1 { 1 } else { usize::MAX };
        let mut state = vec![State::Waiting; total];
        let mut busy: BTreeMap<&str, usize> = BTreeMap::new();
        let mut running = FuturesUnordered::new();
        let mut report = ApplyReport::default();
        let mut halted = false;
        loop {
            if !halted && self.stop.is_some_and(|s| s.load(std::sync::atomic::Ordering::SeqCst)) {
                halted = true;
                report.stopped = state.contains(&State::Waiting);
            }
            if !halted {
                for i in 0..total {
                    let node = steps[i].pve_node.as_str();
                    let ready = state[i] == State::Waiting
                        && after[i].iter().all(|&j| state[j] == State::Done)
                        && busy.get(node).copied().unwrap_or(0) < per_node
                        && running.len() < overall;
                    if ready {
                        state[i] = State::Running;
                        *busy.entry(node).or_default() += 1;
                        progress.step_started(i, total, &steps[i]);
                        running.push(self.run_one(i, &steps[i]));
                    }
                }
            }
            let Some(outcome) = running.next().await else { break };
            let step = &steps[outcome.index];
            state[outcome.index] = State::Done;
            *busy.get_mut(step.pve_node.as_str()).expect("counted when started") -= 1;
            progress.step_finished(&outcome);
            halted |= !outcome.ok;
            report.done.push(outcome);
        }
        report.not_done = (0..total)
            .filter(|&i| state[i] == State::Waiting)
            .map(|i| steps[i].describe())
            .collect();
        report
    }

    /// One step, timed, with its log and its error (which never holds a secret).
    async fn run_one(&self, index: usize, step: &Step) -> StepOutcome {
        let started = tokio::time::Instant::now();
        let mut log = Vec::new();
        let result = self.run_step(step, &mut log).await;
        StepOutcome {
            index,
            node: step.node.clone(),
            vmid: step.vmid,
            action: step.action.verb(),
            ok: result.is_ok(),
            duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            failed_system: result.as_ref().err().map(ApplyError::system),
            error: result.err().map(|e| e.to_string()),
            log,
        }
    }

    fn shell(&self) -> Result<&H, ApplyError> {
        self.shell.ok_or(ApplyError::NoHostShell)
    }

    async fn run_step(&self, step: &Step, log: &mut Vec<String>) -> Result<(), ApplyError> {
        if step.action.is_cluster() {
            let cluster = self.cluster.ok_or(ApplyError::NoClusterLayer)?;
            return Ok(cluster.run(step, log).await?);
        }
        self.run_guest_step(step, log).await?;
        if let Some(cluster) = self.cluster
            && matches!(step.action, Action::Restart { .. } | Action::Start)
        {
            cluster.after_guest_step(step, log).await?;
        }
        Ok(())
    }

    async fn run_guest_step(&self, step: &Step, log: &mut Vec<String>) -> Result<(), ApplyError> {
        let (node, kind, vmid) = (step.pve_node.as_str(), step.kind, step.vmid);
        match &step.action {
            Action::Create {
                params,
                root_options,
                raw_lxc,
                ..
            } => {
                let upid = self.proxmox.create(node, kind, params).await?;
                self.proxmox.wait_task(&upid).await?;
                log.push(format!("created ({})", upid.0));
                if !root_options.is_empty() {
                    hostshell::pct_set(self.shell()?, node, &self.host.pct_command, vmid, root_options).await?;
                    log.push(format!(
                        "set as root: {}",
                        root_options
                            .iter()
                            .map(|(k, _)| k.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ));
                }
                if !raw_lxc.is_empty() {
                    self.write_raw(node, vmid, raw_lxc).await?;
                    log.push(format!("wrote {} raw lxc keys", raw_lxc.len()));
                }
                let upid = self.proxmox.power(node, kind, vmid, PowerAction::Start).await?;
                self.proxmox.wait_task(&upid).await?;
                log.push("started".into());
            }
            Action::Update {
                changes,
                digest,
                desired,
            } => {
                self.update(step, changes.clone(), digest.clone(), desired, log).await?;
            }
            Action::Restart { .. } => {
                let upid = self.proxmox.power(node, kind, vmid, PowerAction::Reboot).await?;
                self.proxmox.wait_task(&upid).await?;
                log.push("restarted".into());
            }
            Action::Start => {
                let upid = self.proxmox.power(node, kind, vmid, PowerAction::Start).await?;
                self.proxmox.wait_task(&upid).await?;
                log.push("started".into());
            }
            Action::Delete { running } => {
                if *running {
                    let upid = self.proxmox.power(node, kind, vmid, PowerAction::Stop).await?;
                    self.proxmox.wait_task(&upid).await?;
                    log.push("stopped".into());
                }
                let upid = self.proxmox.delete_guest(node, kind, vmid).await?;
                self.proxmox.wait_task(&upid).await?;
                log.push("deleted".into());
            }
            _ => unreachable!("cluster steps are run by the cluster layer"),
        }
        Ok(())
    }

    /// Raw keys go into the config file on the host, guarded by the digest the API reports now.
    async fn write_raw(&self, node: &str, vmid: u32, raw: &[(String, String)]) -> Result<(), ApplyError> {
        let live = self.proxmox.read_config(node, PveKind::Lxc, vmid).await?;
        hostshell::apply_raw_lxc_keys(self.shell()?, &self.host.pve_root, node, vmid, raw, &[], &live.digest).await?;
        Ok(())
    }

    async fn update(
        &self,
        step: &Step,
        mut changes: Vec<Change>,
        mut digest: String,
        desired: &DesiredGuest,
        log: &mut Vec<String>,
    ) -> Result<(), ApplyError> {
        let (node, kind, vmid) = (step.pve_node.as_str(), step.kind, step.vmid);
        const ATTEMPTS: u32 = 3;
        for attempt in 1..=ATTEMPTS {
            let mut set = BTreeMap::new();
            let mut delete = Vec::new();
            for c in changes.iter().filter(|c| c.via == Via::Api) {
                match &c.new {
                    Some(v) if c.key == "tags" => {
                        set.insert(c.key.clone(), normalize_tags(std::slice::from_ref(v)).join(";"));
                    }
                    Some(v) => {
                        set.insert(c.key.clone(), v.clone());
                    }
                    None => delete.push(c.key.clone()),
                }
            }
            if set.is_empty() && delete.is_empty() {
                break;
            }
            match self
                .proxmox
                .update_config(node, kind, vmid, &set, &delete, &digest)
                .await
            {
                Ok(()) => {
                    log.push(format!(
                        "updated {}",
                        set.keys().chain(delete.iter()).cloned().collect::<Vec<_>>().join(", ")
                    ));
                    break;
                }
                Err(ProxmoxError::DigestMismatch) if attempt < ATTEMPTS => {
                    // Someone changed the guest since it was read: read it again and re-plan
                    // this guest from what is there now. Never overwrite their change blindly.
                    log.push("config changed since it was read: observed again and re-planned".into());
                    let live = self.proxmox.read_config(node, kind, vmid).await?;
                    let running = self
                        .proxmox
                        .list_guests()
                        .await?
                        .iter()
                        .any(|g| g.vmid == vmid && g.status == "running");
                    changes = diff_guest(desired, &live, running).changes;
                    digest = live.digest;
                }
                Err(ProxmoxError::DigestMismatch) => {
                    return Err(ApplyError::KeptChanging {
                        vmid,
                        attempts: ATTEMPTS,
                    });
                }
                Err(e) => return Err(e.into()),
            }
        }
        let root: Vec<(String, String)> = changes
            .iter()
            .filter(|c| c.via == Via::RootShell)
            .map(|c| (c.key.clone(), c.new.clone().unwrap_or_default()))
            .collect();
        if !root.is_empty() {
            hostshell::pct_set(self.shell()?, node, &self.host.pct_command, vmid, &root).await?;
            log.push(format!(
                "set as root: {}",
                root.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>().join(", ")
            ));
        }
        if changes.iter().any(|c| c.via == Via::ConfFile) {
            self.write_raw(node, vmid, &desired.raw_lxc).await?;
            log.push(format!("wrote {} raw lxc keys", desired.raw_lxc.len()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Desired;
    use crate::plan::desired_guests;
    use crate::ports::fakes::{FakeHostShell, FakeProxmox};
    use crate::test_repo::lab;
    use std::sync::atomic::{AtomicBool, Ordering};

    async fn plan_on(proxmox: &FakeProxmox, desired: &Desired, guests: &[DesiredGuest]) -> Plan {
        let observed = observe(proxmox, guests).await.unwrap();
        crate::plan::plan(desired, guests, &observed)
    }

    fn applier<'a>(
        proxmox: &'a FakeProxmox,
        shell: &'a FakeHostShell,
        host: &'a HostShellSettings,
        stop: Option<&'a AtomicBool>,
    ) -> Applier<'a, FakeProxmox, FakeHostShell> {
        Applier {
            proxmox,
            shell: Some(shell),
            host,
            stop,
            cluster: None,
            parallelism: 1,
            control_plane: BTreeSet::new(),
        }
    }

    /// Sets `stop` once `after` steps have finished: a shutdown arriving mid-apply.
    struct StopAfter<'a> {
        stop: &'a AtomicBool,
        after: usize,
        finished: usize,
    }

    impl Progress for StopAfter<'_> {
        fn step_started(&mut self, _: usize, _: usize, _: &Step) {}
        fn step_finished(&mut self, _: &StepOutcome) {
            self.finished += 1;
            if self.finished == self.after {
                self.stop.store(true, Ordering::SeqCst);
            }
        }
    }

    #[tokio::test]
    async fn the_first_failure_stops_the_apply_and_the_report_says_what_was_not_done() {
        let (desired, artifacts) = lab();
        let guests = desired_guests(&desired, &artifacts);
        let proxmox = FakeProxmox::new();
        proxmox.fail_task("create", 101);
        let plan = plan_on(&proxmox, &desired, &guests).await;
        assert_eq!(plan.steps.len(), 3);
        let (shell, host) = (FakeHostShell::default(), HostShellSettings::default());
        let report = applier(&proxmox, &shell, &host, None).apply(&plan, &mut ()).await;

        assert!(!report.ok());
        assert_eq!(report.done.len(), 2);
        assert!(report.done[0].ok, "{:?}", report.done[0]);
        let failed = &report.done[1];
        assert_eq!((failed.node.as_str(), failed.ok), ("k3s-2", false));
        assert!(
            failed.error.as_deref().unwrap().contains("failed: command failed"),
            "{failed:?}"
        );
        assert_eq!(failed.failed_system, Some(System::Proxmox));
        assert_eq!(report.not_done, ["create k3s-3 (vmid 102)"]);
        assert!(
            !proxmox.calls().iter().any(|c| c.contains("102")),
            "{:?}",
            proxmox.calls()
        );
    }

    #[tokio::test]
    async fn a_digest_conflict_reads_the_guest_again_and_replans_it_instead_of_overwriting() {
        let (desired, artifacts) = lab();
        let guests = desired_guests(&desired, &artifacts);
        let proxmox = FakeProxmox::new();
        let (shell, host) = (FakeHostShell::default(), HostShellSettings::default());
        let create = plan_on(&proxmox, &desired, &guests).await;
        assert!(
            applier(&proxmox, &shell, &host, None)
                .apply(&create, &mut ())
                .await
                .ok()
        );
        assert!(plan_on(&proxmox, &desired, &guests).await.is_empty(), "converged");

        // Drift on k3s-2, then someone else edits it between driftless's read and its update.
        let digest = proxmox.guest(101).unwrap().config.digest;
        let cores = BTreeMap::from([("cores".to_string(), "4".to_string())]);
        proxmox
            .update_config("pve", PveKind::Lxc, 101, &cores, &[], &digest)
            .await
            .unwrap();
        let plan = plan_on(&proxmox, &desired, &guests).await;
        assert_eq!(plan.steps.len(), 1, "{plan:?}");
        proxmox.edit_before_next_update(101, "memory", "8192");
        let report = applier(&proxmox, &shell, &host, None).apply(&plan, &mut ()).await;

        assert!(report.ok(), "{report:?}");
        let log = &report.done[0].log;
        assert!(
            log.iter().any(|l| l.contains("observed again and re-planned")),
            "{log:?}"
        );
        let updates: Vec<String> = proxmox
            .calls()
            .into_iter()
            .filter(|c| c.starts_with("update 101"))
            .collect();
        assert_eq!(
            updates,
            ["update 101 cores", "update 101 cores", "update 101 cores,memory"]
        );
        let live = proxmox.guest(101).unwrap().config.options;
        let wanted = &guests[1].options;
        assert_eq!((&live["cores"], &live["memory"]), (&wanted["cores"], &wanted["memory"]));
        assert!(plan_on(&proxmox, &desired, &guests).await.is_empty());
    }

    #[tokio::test]
    async fn a_stop_request_ends_the_apply_between_two_steps() {
        let (desired, artifacts) = lab();
        let guests = desired_guests(&desired, &artifacts);
        let proxmox = FakeProxmox::new();
        let plan = plan_on(&proxmox, &desired, &guests).await;
        let (shell, host) = (FakeHostShell::default(), HostShellSettings::default());
        let stop = AtomicBool::new(false);
        let mut progress = StopAfter {
            stop: &stop,
            after: 1,
            finished: 0,
        };
        let report = applier(&proxmox, &shell, &host, Some(&stop))
            .apply(&plan, &mut progress)
            .await;

        assert!(report.stopped && !report.ok());
        assert_eq!(report.done.len(), 1);
        assert!(report.done[0].ok, "the step under way finished: {:?}", report.done[0]);
        assert_eq!(report.not_done, ["create k3s-2 (vmid 101)", "create k3s-3 (vmid 102)"]);
        assert_eq!(proxmox.guest(100).unwrap().summary.status, "running");
        assert!(proxmox.guest(101).is_none());
    }

    /// What a run looked like: starts and ends of steps in the order they happened, with
    /// tokio's (paused) clock.
    #[derive(Default)]
    struct Recorder {
        events: Vec<(bool, usize, tokio::time::Instant)>,
    }

    impl Progress for Recorder {
        fn step_started(&mut self, index: usize, _: usize, _: &Step) {
            self.events.push((true, index, tokio::time::Instant::now()));
        }
        fn step_finished(&mut self, outcome: &StepOutcome) {
            self.events.push((false, outcome.index, tokio::time::Instant::now()));
        }
    }

    impl Recorder {
        /// The most steps that were running at one time.
        fn most_at_once(&self) -> usize {
            let (mut now, mut most) = (0usize, 0usize);
            for (start, ..) in &self.events {
                if *start {
                    now += 1;
                    most = most.max(now);
                } else {
                    now -= 1;
                }
            }
            most
        }

        fn starts(&self) -> Vec<usize> {
            self.events.iter().filter(|e| e.0).map(|e| e.1).collect()
        }
    }

    fn parallel<'a>(
        proxmox: &'a FakeProxmox,
        shell: &'a FakeHostShell,
        host: &'a HostShellSettings,
        parallelism: usize,
    ) -> Applier<'a, FakeProxmox, FakeHostShell> {
        Applier {
            parallelism,
            ..applier(proxmox, shell, host, None)
        }
    }

    /// Proxmox tasks as long as on a real host: a container create unpacks a template.
    fn realistic_tasks(proxmox: &FakeProxmox) {
        proxmox.set_task_duration("create", std::time::Duration::from_secs(3));
        proxmox.set_task_duration("start", std::time::Duration::from_millis(800));
    }

    #[tokio::test(start_paused = true)]
    async fn guests_are_created_side_by_side_never_more_than_the_bound_at_once() {
        let (desired, artifacts) = crate::test_repo::load_files(&crate::test_repo::files_of(20));
        let guests = desired_guests(&desired, &artifacts);
        let proxmox = FakeProxmox::new();
        realistic_tasks(&proxmox);
        let plan = plan_on(&proxmox, &desired, &guests).await;
        assert_eq!(plan.steps.len(), 20);
        let (shell, host) = (FakeHostShell::default(), HostShellSettings::default());
        let mut recorder = Recorder::default();
        let started = tokio::time::Instant::now();
        let report = parallel(&proxmox, &shell, &host, 4).apply(&plan, &mut recorder).await;

        assert!(report.ok(), "{report:?}");
        assert_eq!(recorder.most_at_once(), 4);
        // ceil(20 / 4) rounds of one guest's chain of tasks (create 3 s + start 0.8 s).
        assert_eq!(started.elapsed(), std::time::Duration::from_millis(5 * 3800));
        assert_eq!(report.done.iter().map(|s| s.duration_ms).max(), Some(3800));
    }

    #[tokio::test(start_paused = true)]
    async fn a_parallelism_of_one_runs_the_plan_in_its_order_one_step_at_a_time() {
        let (desired, artifacts) = crate::test_repo::load_files(&crate::test_repo::files_of(6));
        let guests = desired_guests(&desired, &artifacts);
        let proxmox = FakeProxmox::new();
        realistic_tasks(&proxmox);
        let plan = plan_on(&proxmox, &desired, &guests).await;
        let (shell, host) = (FakeHostShell::default(), HostShellSettings::default());
        let mut recorder = Recorder::default();
        let report = parallel(&proxmox, &shell, &host, 1).apply(&plan, &mut recorder).await;

        assert!(report.ok());
        assert_eq!(recorder.most_at_once(), 1);
        assert_eq!(recorder.starts(), (0..6).collect::<Vec<_>>());
        let done: Vec<&str> = report.done.iter().map(|s| s.node.as_str()).collect();
        assert_eq!(done, ["k3s-1", "k3s-2", "k3s-3", "k3s-4", "k3s-5", "k3s-6"]);
    }

    #[tokio::test(start_paused = true)]
    async fn after_a_failure_no_new_step_starts_and_running_steps_finish() {
        let (desired, artifacts) = crate::test_repo::load_files(&crate::test_repo::files_of(6));
        let guests = desired_guests(&desired, &artifacts);
        let proxmox = FakeProxmox::new();
        realistic_tasks(&proxmox);
        // k3s-1's create fails when its task ends, while k3s-2's create is still running.
        proxmox.set_task_duration("create", std::time::Duration::from_secs(3));
        proxmox.fail_task("create", 100);
        let plan = plan_on(&proxmox, &desired, &guests).await;
        let (shell, host) = (FakeHostShell::default(), HostShellSettings::default());
        let mut recorder = Recorder::default();
        let report = parallel(&proxmox, &shell, &host, 2).apply(&plan, &mut recorder).await;

        assert!(!report.ok());
        assert_eq!(recorder.starts(), [0, 1], "nothing started after the failure");
        let outcomes: Vec<(&str, bool)> = report.done.iter().map(|s| (s.node.as_str(), s.ok)).collect();
        assert_eq!(
            outcomes,
            [("k3s-1", false), ("k3s-2", true)],
            "the running step finished"
        );
        assert_eq!(
            report.not_done,
            [
                "create k3s-3 (vmid 102)",
                "create k3s-4 (vmid 103)",
                "create k3s-5 (vmid 104)",
                "create k3s-6 (vmid 105)"
            ]
        );
        assert!(proxmox.guest(102).is_none());
    }
}
