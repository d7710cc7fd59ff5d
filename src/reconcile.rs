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
use crate::ports::{ClusterConnector, HostShell, ProxmoxApi, ProxmoxError, System};
use crate::render::Artifact;
use crate::secrets::SecretStore;
use crate::settings::{HostShellSettings, RunSettings};

/// Why a run could not plan (or look at the cluster); an apply's step failures are in its
/// [`ApplyReport`] instead.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot read the guests from Proxmox: {0}")]
    Proxmox(#[source] ProxmoxError),
    #[error("cannot observe the cluster: {0}")]
    Cluster(#[source] ClusterError),
    #[error("the cluster layer is off for this run (--guests-only)")]
    NoClusterLayer,
}

impl RunError {
    /// The system the failure is blamed on (what the daemon's metrics count).
    pub fn system(&self) -> System {
        match self {
            RunError::Proxmox(_) => System::Proxmox,
            RunError::Cluster(e) => e.system(),
            RunError::NoClusterLayer => System::Repository,
        }
    }

    /// Whether running again later can succeed without a change to the repository.
    pub fn retryable(&self) -> bool {
        match self {
            RunError::Proxmox(e) => e.retryable(),
            RunError::Cluster(e) => e.retryable(),
            RunError::NoClusterLayer => false,
        }
    }
}

/// One run against one desired state.
pub struct Reconcile<'a, P: ProxmoxApi, H: HostShell, C: ClusterConnector> {
    desired: &'a Desired,
    artifacts: &'a [Artifact],
    proxmox: &'a P,
    host: Option<&'a H>,
    host_settings: &'a HostShellSettings,
    /// `None` with `--guests-only`: guest steps only.
    cluster: Option<ClusterAccess<'a, C>>,
}

impl<'a> Reconcile<'a, crate::adapters::proxmox::ProxmoxClient, AnyHostShell, NodeConnector> {
    /// A run on the real systems `connection` reaches.
    pub fn connected(desired: &'a Desired, artifacts: &'a [Artifact], connection: &'a Connection) -> Self {
        Reconcile::new(
            desired,
            artifacts,
            &connection.proxmox,
            connection.host_shell(),
            &connection.nodes,
            &connection.settings,
        )
    }
}

impl<'a, P: ProxmoxApi, H: HostShell, C: ClusterConnector> Reconcile<'a, P, H, C> {
    pub fn new(
        desired: &'a Desired,
        artifacts: &'a [Artifact],
        proxmox: &'a P,
        host: Option<&'a H>,
        nodes: &'a C,
        settings: &'a RunSettings,
    ) -> Self {
        let cluster = settings.cluster.enabled.then(|| {
            ClusterAccess::new(
                desired,
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
            cluster,
        }
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

    /// Apply `plan`: one step at a time, every task awaited, a health gate after every
    /// disruptive step, stopping at the first failure or, between two steps, when `stop` is set.
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
        };
        applier.apply(plan, progress).await
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
        let run = Reconcile::new(&desired, &artifacts, &proxmox, Some(&shell), &cluster, &settings);

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
        let run = Reconcile::new(&desired, &artifacts, &proxmox, Some(&shell), &cluster, &settings);
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
        let run = Reconcile::new(&desired, &artifacts, &proxmox, Some(&shell), &cluster, &settings);
        let err = run.plan().await.unwrap_err();
        assert_eq!(err.system(), System::Proxmox);
        assert!(err.retryable());
        assert_eq!(
            err.to_string(),
            "cannot read the guests from Proxmox: cannot reach Proxmox at https://127.0.0.1:8006: connection refused"
        );
    }
}
