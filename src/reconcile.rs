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
