//! One run: observe Proxmox and the cluster, plan, and apply, through the ports.
//!
//! Every way driftless touches the world goes through here: `driftless plan`, `drift`,
//! `apply` and `health`, and each run of the daemon's worker. A [`Reconcile`] is given the
//! desired state, its rendered artifacts and the ports; it returns a [`Plan`] (a value) and
//! an [`ApplyReport`], reporting progress and stopping between two steps when asked.
//! [`Reconcile::connected`] builds one on the real systems from a [`Connection`].

use std::sync::atomic::AtomicBool;

use crate::apply::{Applier, ApplyReport, ClusterSteps, Progress, observe};
use crate::cluster::access::{ClusterAccess, ClusterError};
use crate::cluster::health::Health;
use crate::connect::{AnyHostShell, Connection, NodeConnector};
use crate::model::Desired;
use crate::plan::{Notice, Plan, desired_guests};
use crate::ports::{ClusterConnector, HeldCommand, HostShell, ProxmoxApi, ProxmoxError, ShellError, System};
use crate::render::Artifact;
use crate::secrets::SecretStore;
use crate::settings::{HostShellSettings, RunSettings};

/// Why a run could not plan (or look at the cluster); an apply's step failures are in its
/// [`ApplyReport`] instead.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    // The cause is in the message and not a `#[source]`: printed as a chain, it would repeat.
    #[error("cannot read the guests from Proxmox: {0}")]
    Proxmox(ProxmoxError),
    #[error("cannot observe the cluster: {0}")]
    Cluster(ClusterError),
    #[error("the cluster layer is off for this run (--guests-only)")]
    NoClusterLayer,
    #[error("cannot take the run lock: {0}")]
    Lock(ShellError),
}

impl RunError {
    /// The system the failure is blamed on (what the daemon's metrics count).
    pub fn system(&self) -> System {
        match self {
            RunError::Proxmox(_) => System::Proxmox,
            RunError::Cluster(e) => e.system(),
            RunError::NoClusterLayer => System::Repository,
            RunError::Lock(_) => System::Ssh,
        }
    }

    /// Whether running again later can succeed without a change to the repository.
    pub fn retryable(&self) -> bool {
        match self {
            RunError::Proxmox(e) => e.retryable(),
            RunError::Cluster(e) => e.retryable(),
            RunError::NoClusterLayer => false,
            RunError::Lock(e) => e.retryable(),
        }
    }
}

/// Who this process is, for the run lock's holder line: `driftless apply by
/// USER@HOST (pid N)`.
pub fn lock_holder(what: &str) -> String {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "?".into());
    let mut name = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates within it
    // or truncates, and only bytes before the first NUL are read.
    let host = if unsafe { libc::gethostname(name.as_mut_ptr().cast(), name.len()) } == 0 {
        let end = name.iter().position(|b| *b == 0).unwrap_or(name.len());
        String::from_utf8_lossy(&name[..end]).into_owned()
    } else {
        "?".into()
    };
    format!("driftless {what} by {user}@{host} (pid {})", std::process::id())
}

/// One run against one desired state.
pub struct Reconcile<'a, P: ProxmoxApi, H: HostShell, C: ClusterConnector> {
    desired: &'a Desired,
    artifacts: &'a [Artifact],
    proxmox: &'a P,
    host: Option<&'a H>,
    host_settings: &'a HostShellSettings,
    /// Steps at once per Proxmox node.
    parallelism: usize,
    /// `None` with `--guests-only`: guest steps only.
    cluster: Option<ClusterAccess<'a, C>>,
    lock_wait: std::time::Duration,
}

impl<'a> Reconcile<'a, crate::adapters::proxmox::ProxmoxClient, AnyHostShell, NodeConnector> {
    /// A run on the real systems `connection` reaches (opened from `trusted`).
    pub fn connected(
        desired: &'a Desired,
        trusted: &'a Desired,
        artifacts: &'a [Artifact],
        connection: &'a Connection,
    ) -> Self {
        Reconcile::new(
            desired,
            trusted,
            artifacts,
            &connection.proxmox,
            connection.host_shell(),
            &connection.nodes,
            &connection.settings,
        )
    }
}

impl<'a, P: ProxmoxApi, H: HostShell, C: ClusterConnector> Reconcile<'a, P, H, C> {
    /// A run that plans `desired` and reaches only what `trusted` names (the same state for
    /// the watched branch and one-shot commands; the watched branch's for a pull request).
    pub fn new(
        desired: &'a Desired,
        trusted: &'a Desired,
        artifacts: &'a [Artifact],
        proxmox: &'a P,
        host: Option<&'a H>,
        nodes: &'a C,
        settings: &'a RunSettings,
    ) -> Self {
        let cluster = settings.cluster.enabled.then(|| {
            ClusterAccess::new(
                desired,
                trusted,
                artifacts,
                nodes,
                settings.cluster.clone(),
                SecretStore::new(&settings.secrets_dir),
            )
        });
        Reconcile {
            desired,
            artifacts,
            proxmox,
            host,
            host_settings: &settings.host,
            parallelism: settings
                .parallelism
                .unwrap_or(desired.cluster.reconcile.parallelism as usize)
                .max(1),
            cluster,
            lock_wait: settings.lock_wait,
        }
    }

    /// Take the cluster's run lock for an apply (its plan included): one run at a time,
    /// whichever machine it runs on, held on the first Proxmox node's host until the
    /// returned guard is dropped. Waits up to `--lock-wait` for a run holding it, then
    /// refuses naming that run. `None` without a host shell (an API-only setup): nothing
    /// to hold a lock on. Plans take no lock; they write nothing.
    pub async fn lock(&self, holder: &str) -> Result<Option<HeldCommand>, RunError> {
        let Some(shell) = self.host else { return Ok(None) };
        let node = self
            .desired
            .cluster
            .proxmox
            .hosts
            .keys()
            .next()
            .or_else(|| self.desired.nodes.iter().map(|n| &n.proxmox_node).min())
            .cloned()
            .unwrap_or_else(|| "pve".into());
        let path = crate::hostshell::run_lock_path(&self.host_settings.pve_root, &self.desired.cluster.name);
        tracing::debug!(node = %node, path = %path, "taking the run lock");
        crate::hostshell::lock_run(shell, &node, &path, holder, self.lock_wait)
            .await
            .map(Some)
            .map_err(RunError::Lock)
    }

    /// Read Proxmox, then (unless the cluster layer is off) the nodes and the Kubernetes
    /// API, and plan both layers. Writes nothing.
    pub async fn plan(&self) -> Result<Plan, RunError> {
        let guests = desired_guests(self.desired, self.artifacts);
        let observed = observe(self.proxmox, &guests).await.map_err(RunError::Proxmox)?;
        let plan = crate::plan::plan(self.desired, &guests, &observed);
        let Some(cluster) = &self.cluster else { return Ok(plan) };
        let (seen, notices) = cluster.observe(&observed).await.map_err(RunError::Cluster)?;
        let mut plan = crate::cluster::plan::merge(self.desired, self.artifacts, &seen, plan);
        plan.notices.extend(notices.into_iter().map(|message| Notice {
            node: "cluster".into(),
            vmid: 0,
            message,
        }));
        Ok(plan)
    }

    /// Apply `plan`: steps that do not depend on each other side by side (plan::schedule's
    /// rules, up to the parallelism bound), every task awaited, a health gate after every
    /// disruptive step; the first failure, or `stop`, lets running steps finish and starts no new one.
    pub async fn apply(
        &self,
        plan: &Plan,
        progress: &mut (dyn Progress + Send),
        stop: Option<&AtomicBool>,
    ) -> ApplyReport {
        let applier = Applier {
            proxmox: self.proxmox,
            shell: self.host,
            host: self.host_settings,
            stop,
            cluster: self.cluster.as_ref().map(|c| c as &dyn ClusterSteps),
            parallelism: self.parallelism,
            control_plane: self.desired.control_plane().map(|n| n.name.clone()).collect(),
        };
        let retried_before = self.proxmox.retries();
        let mut report = applier.apply(plan, progress).await;
        report.api_retries = self.proxmox.retries().saturating_sub(retried_before);
        report
    }

    /// The cluster health view (`driftless health`).
    pub async fn health(&self) -> Result<Health, RunError> {
        let cluster = self.cluster.as_ref().ok_or(RunError::NoClusterLayer)?;
        cluster.health().await.map_err(RunError::Cluster)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::k3s;
    use crate::ports::fakes::{FakeCluster, FakeHostShell, FakeProxmox};
    use crate::settings::ClusterSettings;
    use crate::test_repo::lab;
    use std::time::Duration;

    fn settings(secrets: &std::path::Path) -> RunSettings {
        let defaults = RunSettings::default();
        RunSettings {
            secrets_dir: secrets.to_path_buf(),
            cluster: ClusterSettings {
                gate_timeout: Duration::from_secs(5),
                ..defaults.cluster.clone()
            },
            ..defaults
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_run_creates_the_guests_then_sets_k3s_up_server_first_and_gates_every_node() {
        let (desired, artifacts) = lab();
        let (proxmox, shell) = (FakeProxmox::new(), FakeHostShell::default());
        let cluster = FakeCluster::with_nodes(&["k3s-1", "k3s-2", "k3s-3"]);
        // What K3s writes on the server at its first start.
        let server = &cluster.nodes["k3s-1"];
        server.files.lock().unwrap().insert(
            k3s::KUBECONFIG_PATH.into(),
            b"clusters:\n- cluster:\n    server: https://127.0.0.1:6443\n".to_vec(),
        );
        server
            .files
            .lock()
            .unwrap()
            .insert(k3s::SERVER_TOKEN_PATH.into(), b"K10abc::server:s3cret\n".to_vec());
        for n in ["k3s-1", "k3s-2", "k3s-3"] {
            cluster.kube.ready_node(n);
        }
        let secrets = tempfile::tempdir().unwrap();
        let settings = settings(secrets.path());
        let run = Reconcile::new(
            &desired,
            &desired,
            &artifacts,
            &proxmox,
            Some(&shell),
            &cluster,
            &settings,
        );

        let plan = run.plan().await.unwrap();
        for node in cluster.nodes.values() {
            assert!(
                node.commands.lock().unwrap().is_empty(),
                "{} was reached before its guest ran",
                node.name
            );
        }
        let order: Vec<String> = plan
            .steps
            .iter()
            .map(|s| format!("{} {}", s.action.verb(), s.node))
            .collect();
        assert_eq!(
            order,
            [
                "create k3s-1",
                "install k3s k3s-1",
                "configure k3s k3s-1",
                "create k3s-2",
                "install k3s k3s-2",
                "configure k3s k3s-2",
                "create k3s-3",
                "install k3s k3s-3",
                "configure k3s k3s-3",
            ]
        );

        let report = run.apply(&plan, &mut (), None).await;
        assert!(report.ok(), "{report:#?}");
        for done in &report.done[2..] {
            if done.action == "configure k3s" {
                assert!(
                    done.log.iter().any(|l| l.ends_with("Ready, API ready (0 ms)")),
                    "{done:?}"
                );
            }
        }
        // The agents join the server at its address, with its token as file contents.
        let agent = cluster.nodes["k3s-2"].files.lock().unwrap().clone();
        let config = String::from_utf8(agent[k3s::CONFIG_PATH].clone()).unwrap();
        assert!(config.contains("server: https://10.0.0.11:6443"), "{config}");
        assert!(!config.contains("s3cret"), "the token is never in config.yaml");
        assert!(String::from_utf8_lossy(&agent[k3s::TOKEN_PATH]).contains("s3cret"));
        let kubeconfig = std::fs::read_to_string(secrets.path().join("kubeconfig")).unwrap();
        assert!(kubeconfig.contains("server: https://10.0.0.11:6443"), "{kubeconfig}");
    }

    #[tokio::test]
    async fn a_run_without_the_cluster_layer_plans_guests_only_and_has_no_health_view() {
        let (desired, artifacts) = lab();
        let (proxmox, shell) = (FakeProxmox::new(), FakeHostShell::default());
        let cluster = FakeCluster::with_nodes(&["k3s-1"]);
        let secrets = tempfile::tempdir().unwrap();
        let mut settings = settings(secrets.path());
        settings.cluster.enabled = false;
        let run = Reconcile::new(
            &desired,
            &desired,
            &artifacts,
            &proxmox,
            Some(&shell),
            &cluster,
            &settings,
        );
        let plan = run.plan().await.unwrap();
        assert!(plan.steps.iter().all(|s| s.action.verb() == "create"), "{plan:?}");
        let err = run.health().await.unwrap_err();
        assert!(matches!(err, RunError::NoClusterLayer));
        assert!(!err.retryable());
    }

    #[tokio::test]
    async fn an_unreachable_proxmox_is_a_retryable_proxmox_error() {
        let (desired, artifacts) = lab();
        let (proxmox, shell) = (FakeProxmox::new(), FakeHostShell::default());
        proxmox.fail_next(
            "list",
            ProxmoxError::Transport {
                endpoint: "https://127.0.0.1:8006".into(),
                message: "connection refused".into(),
            },
        );
        let cluster = FakeCluster::default();
        let secrets = tempfile::tempdir().unwrap();
        let settings = settings(secrets.path());
        let run = Reconcile::new(
            &desired,
            &desired,
            &artifacts,
            &proxmox,
            Some(&shell),
            &cluster,
            &settings,
        );
        let err = run.plan().await.unwrap_err();
        assert_eq!(err.system(), System::Proxmox);
        assert!(err.retryable());
        assert_eq!(
            err.to_string(),
            "cannot read the guests from Proxmox: cannot reach Proxmox at https://127.0.0.1:8006: connection refused"
        );
    }

    /// Starts and ends of steps, in the order they happened.
    #[derive(Default)]
    struct Recorder {
        events: Vec<(bool, usize)>,
    }

    impl Progress for Recorder {
        fn step_started(&mut self, index: usize, _: usize, _: &crate::plan::Step) {
            self.events.push((true, index));
        }
        fn step_finished(&mut self, outcome: &crate::apply::StepOutcome) {
            self.events.push((false, outcome.index));
        }
    }

    impl Recorder {
        fn position(&self, start: bool, index: usize) -> usize {
            self.events.iter().position(|&e| e == (start, index)).unwrap()
        }

        /// Whether steps `a` and `b` were running at the same time.
        fn overlap(&self, a: usize, b: usize) -> bool {
            let (a0, a1) = (self.position(true, a), self.position(false, a));
            let (b0, b1) = (self.position(true, b), self.position(false, b));
            a0 < b1 && b0 < a1
        }
    }

    /// A K3s lab of `n` nodes whose guests run as the repository says, with K3s `version`
    /// running on every node and its config as rendered.
    fn running_lab(n: u32, version: &str) -> (Desired, Vec<Artifact>, FakeProxmox, FakeCluster) {
        use crate::ports::{GuestSummary, PveKind};
        use crate::render::ArtifactKind;
        let (desired, artifacts) = crate::test_repo::load_files(&crate::test_repo::files_of(n));
        let proxmox = FakeProxmox::new();
        for g in crate::plan::desired_guests(&desired, &artifacts) {
            let summary = GuestSummary {
                vmid: g.vmid,
                node: g.pve_node.clone(),
                kind: PveKind::Lxc,
                name: Some(g.node.clone()),
                status: "running".into(),
                tags: vec!["driftless".into()],
            };
            proxmox.insert(summary, g.options.clone());
        }
        let names: Vec<String> = desired.nodes.iter().map(|n| n.name.clone()).collect();
        let cluster = FakeCluster::with_nodes(&names.iter().map(String::as_str).collect::<Vec<_>>());
        let token = crate::secrets::Secret::new("K10abc::server:s3cret");
        let token_sha = k3s::sha256_hex(&k3s::token_file_contents(&token));
        for node in &desired.nodes {
            let config = artifacts
                .iter()
                .find(|a| a.node == node.name && a.kind == ArtifactKind::K3sConfig)
                .unwrap();
            let fake = &cluster.nodes[&node.name];
            let mut seen = format!(
                "version={version}\nactive={}\nconfig_sha256={}\n",
                k3s::service(&node.role),
                k3s::sha256_hex(config.content.as_bytes())
            );
            if node.role != "server" {
                seen.push_str(&format!("token_sha256={token_sha}\n"));
            }
            fake.answer("config_sha256=", 0, &seen);
            cluster.kube.ready_node(&node.name);
        }
        cluster.nodes["k3s-1"]
            .files
            .lock()
            .unwrap()
            .insert(k3s::SERVER_TOKEN_PATH.into(), b"K10abc::server:s3cret\n".to_vec());
        (desired, artifacts, proxmox, cluster)
    }

    #[tokio::test(start_paused = true)]
    async fn a_k3s_upgrade_restarts_one_node_at_a_time_even_with_parallelism() {
        let (desired, artifacts, proxmox, cluster) = running_lab(4, "v1.30.9+k3s1");
        let shell = FakeHostShell::default();
        let secrets = tempfile::tempdir().unwrap();
        std::fs::write(secrets.path().join("kubeconfig"), "apiVersion: v1\n").unwrap();
        let settings = RunSettings {
            parallelism: Some(8),
            ..settings(secrets.path())
        };
        let run = Reconcile::new(
            &desired,
            &desired,
            &artifacts,
            &proxmox,
            Some(&shell),
            &cluster,
            &settings,
        );
        let plan = run.plan().await.unwrap();
        assert_eq!(plan.steps.len(), 8, "{plan:#?}");
        assert!(
            plan.steps.iter().all(|s| s.disruptive),
            "upgrading members interrupts them"
        );

        let mut recorder = Recorder::default();
        let report = run.apply(&plan, &mut recorder, None).await;
        assert!(report.ok(), "{report:#?}");
        for a in 0..plan.steps.len() {
            for b in a + 1..plan.steps.len() {
                assert!(!recorder.overlap(a, b), "disruptive steps {a} and {b} ran together");
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn from_empty_the_server_is_set_up_before_any_agent_joins_and_agents_join_together() {
        let (desired, artifacts) = crate::test_repo::load_files(&crate::test_repo::files_of(5));
        let (proxmox, shell) = (FakeProxmox::new(), FakeHostShell::default());
        proxmox.set_task_duration("create", Duration::from_secs(3));
        let names = ["k3s-1", "k3s-2", "k3s-3", "k3s-4", "k3s-5"];
        let cluster = FakeCluster::with_nodes(&names);
        let server = &cluster.nodes["k3s-1"];
        server.files.lock().unwrap().extend([
            (
                k3s::KUBECONFIG_PATH.to_string(),
                b"server: https://127.0.0.1:6443\n".to_vec(),
            ),
            (k3s::SERVER_TOKEN_PATH.to_string(), b"K10abc::server:s3cret\n".to_vec()),
        ]);
        for n in names {
            cluster.kube.ready_node(n);
        }
        let secrets = tempfile::tempdir().unwrap();
        let settings = settings(secrets.path());
        let run = Reconcile::new(
            &desired,
            &desired,
            &artifacts,
            &proxmox,
            Some(&shell),
            &cluster,
            &settings,
        );
        let plan = run.plan().await.unwrap();
        let mut recorder = Recorder::default();
        let report = run.apply(&plan, &mut recorder, None).await;
        assert!(report.ok(), "{report:#?}");

        let (server_steps, agent_cluster_steps): (Vec<usize>, Vec<usize>) = (0..plan.steps.len())
            .filter(|&i| plan.steps[i].action.is_cluster())
            .partition(|&i| plan.steps[i].node == "k3s-1");
        let server_done = server_steps.iter().map(|&i| recorder.position(false, i)).max().unwrap();
        for &i in &agent_cluster_steps {
            assert!(
                recorder.position(true, i) > server_done,
                "{} started before the server was set up",
                i
            );
        }
        let creates: Vec<usize> = (0..plan.steps.len())
            .filter(|&i| plan.steps[i].action.verb() == "create")
            .collect();
        assert!(
            recorder.overlap(creates[0], creates[4]),
            "guests are created side by side"
        );
        let joins: Vec<usize> = agent_cluster_steps
            .iter()
            .copied()
            .filter(|&i| plan.steps[i].action.verb() == "configure k3s")
            .collect();
        assert!(recorder.overlap(joins[0], joins[3]), "agents join side by side");
    }

    #[tokio::test]
    async fn a_guest_driftless_does_not_own_is_never_looked_into_even_when_a_pull_request_adopts_it() {
        use crate::ports::{GuestSummary, PveKind};
        let trusted = crate::test_repo::load_files(&crate::test_repo::files_of(2)).0;
        let mut pr_files = crate::test_repo::files_of(2);
        // The pull request claims someone's container 200, and points k3s-2 at container 201.
        pr_files.insert(
            "nodes/k3s-3.yaml",
            "vmid: 200\nproxmox_node: pve\nkind: lxc\nrole: agent\naddress: 10.0.0.13/24\nadopt: true\n",
        );
        pr_files.insert(
            "nodes/k3s-2.yaml",
            "vmid: 201\nproxmox_node: pve\nkind: lxc\nrole: agent\naddress: 10.0.0.12/24\nadopt: true\n",
        );
        let (pr, artifacts) = crate::test_repo::load_files(&pr_files);
        let (proxmox, shell) = (FakeProxmox::new(), FakeHostShell::default());
        for (vmid, name, tags) in [
            (100, "k3s-1", vec!["driftless"]),
            (200, "db", vec![]),
            (201, "vault", vec![]),
        ] {
            let summary = GuestSummary {
                vmid,
                node: "pve".into(),
                kind: PveKind::Lxc,
                name: Some(name.into()),
                status: "running".into(),
                tags: tags.into_iter().map(String::from).collect(),
            };
            proxmox.insert(summary, Default::default());
        }
        let cluster = FakeCluster::with_nodes(&["k3s-1", "k3s-2", "k3s-3"]);
        let secrets = tempfile::tempdir().unwrap();
        let settings = settings(secrets.path());
        let run = Reconcile::new(&pr, &trusted, &artifacts, &proxmox, Some(&shell), &cluster, &settings);
        let plan = run.plan().await.unwrap();

        for name in ["k3s-2", "k3s-3"] {
            let ran = cluster.nodes[name].commands.lock().unwrap().clone();
            assert!(ran.is_empty(), "{name}'s container was looked into: {ran:?}");
            assert!(
                plan.notices
                    .iter()
                    .any(|n| n.message.starts_with(&format!("{name}: not observed"))),
                "{:?}",
                plan.notices
            );
        }
        assert!(
            !cluster.nodes["k3s-1"].commands.lock().unwrap().is_empty(),
            "the owned node is observed"
        );
    }
}
