//! The cluster health view: the seed's checks, made one report. The API server's /readyz
//! (which replaces the deprecated `kubectl get componentstatuses`), every node Ready with its
//! kubelet version, the K3s server's node-token present, and the kube-system pods running.

use serde::Serialize;
use std::fmt::Write;

use crate::ports::{KubeNode, PodSummary};

/// The pods a healthy cluster runs in kube-system, by distribution.
pub const K3S_SYSTEM_PODS: [&str; 3] = ["coredns", "traefik", "metrics-server"];
pub const TALOS_SYSTEM_PODS: [&str; 1] = ["coredns"];

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Health {
    pub cluster: String,
    /// `None`: /readyz answered ok; otherwise why not.
    pub api_not_ready: Option<String>,
    pub nodes: Vec<KubeNode>,
    /// Declared nodes the API does not list.
    pub missing_nodes: Vec<String>,
    /// K3s: the first server's node-token exists (agents can join).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_token_present: Option<bool>,
    pub system_pods: Vec<PodSummary>,
    /// Expected kube-system workloads with no running, ready pod.
    pub missing_pods: Vec<String>,
}

impl Health {
    pub fn healthy(&self) -> bool {
        self.api_not_ready.is_none()
            && self.missing_nodes.is_empty()
            && self.nodes.iter().all(|n| n.ready)
            && self.node_token_present != Some(false)
            && self.missing_pods.is_empty()
    }

    /// The workloads of `expected` with no running, ready pod (pods are named `NAME-...`).
    pub fn missing(expected: &[&str], pods: &[PodSummary]) -> Vec<String> {
        expected
            .iter()
            .filter(|w| {
                !pods
                    .iter()
                    .any(|p| p.name.starts_with(&format!("{w}-")) && p.phase == "Running" && p.ready)
            })
            .map(|w| w.to_string())
            .collect()
    }

    pub fn text(&self) -> String {
        let mut out = String::new();
        let mark = |ok: bool| if ok { "ok  " } else { "FAIL" };
        let _ = writeln!(
            out,
            "Cluster `{}`: {}",
            self.cluster,
            if self.healthy() { "healthy" } else { "NOT healthy" }
        );
        let _ = writeln!(
            out,
            "{} API server /readyz{}",
            mark(self.api_not_ready.is_none()),
            self.api_not_ready
                .as_deref()
                .map(|r| format!(": {r}"))
                .unwrap_or_default()
        );
        for n in &self.nodes {
            let _ = writeln!(
                out,
                "{} node {} Ready ({}){}",
                mark(n.ready),
                n.name,
                n.kubelet_version,
                n.not_ready_reason
                    .as_deref()
                    .map(|r| format!(": {r}"))
                    .unwrap_or_default()
            );
        }
        for n in &self.missing_nodes {
            let _ = writeln!(out, "FAIL node {n}: not registered with the API server");
        }
        if let Some(present) = self.node_token_present {
            let _ = writeln!(out, "{} server node-token present", mark(present));
        }
        for p in &self.system_pods {
            let _ = writeln!(
                out,
                "{} pod kube-system/{} {}",
                // A completed Job's pod (a HelmChart's install) has done its work.
                mark((p.phase == "Running" && p.ready) || p.phase == "Succeeded"),
                p.name,
                p.phase
            );
        }
        for w in &self.missing_pods {
            let _ = writeln!(out, "FAIL kube-system workload {w}: no running pod");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, phase: &str, ready: bool) -> PodSummary {
        PodSummary {
            name: name.into(),
            phase: phase.into(),
            ready,
        }
    }

    #[test]
    fn a_workload_counts_only_with_a_running_ready_pod() {
        let pods = [
            pod("coredns-6799fbcd5-abcde", "Running", true),
            pod("traefik-5d45fc8cc9-x", "Pending", false),
            pod("metrics-server-54fd9b65b-y", "Running", false),
        ];
        assert_eq!(Health::missing(&K3S_SYSTEM_PODS, &pods), ["traefik", "metrics-server"]);
    }

    #[test]
    fn one_failing_check_makes_the_cluster_unhealthy_and_is_named() {
        let mut h = Health {
            cluster: "lab".into(),
            api_not_ready: None,
            nodes: vec![KubeNode {
                name: "k3s-master".into(),
                ready: true,
                kubelet_version: "v1.31.4+k3s1".into(),
                ..KubeNode::default()
            }],
            missing_nodes: vec![],
            node_token_present: Some(true),
            system_pods: vec![],
            missing_pods: vec![],
        };
        assert!(h.healthy());
        h.node_token_present = Some(false);
        assert!(!h.healthy());
        assert!(h.text().contains("FAIL server node-token present"), "{}", h.text());
    }
}
