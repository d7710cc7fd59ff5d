//! The values templates see. Built from the desired state; everything a template needs is
//! here already computed (sizes in Proxmox units, tags as Proxmox stores them).

use crate::model::schema::{Distribution, GuestKind};
use crate::model::{Desired, Node};
use serde::Serialize;
use serde_json::Value as Json;
use std::collections::BTreeMap;

#[derive(Debug, Clone, Serialize)]
pub struct ClusterContext {
    pub name: String,
    pub distribution: &'static str,
    pub version: String,
    /// The minor release of `version` (`13` for v1.13.9): templates switch formats on it.
    pub version_minor: u32,
    pub kubernetes_version: Option<String>,
    pub cni: String,
    pub network: NetworkContext,
    /// The Kubernetes API: `https://IP:6443` of the first control plane node (or the configured endpoint).
    pub api_endpoint: String,
    pub control_plane: Vec<PeerContext>,
    pub ownership_tag: String,
    /// Whether the cluster's join token comes from a named secret.
    pub has_token_secret: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct NetworkContext {
    pub cidr: String,
    pub prefix: u8,
    pub gateway: String,
    pub dns: Vec<String>,
    pub search_domain: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PeerContext {
    pub name: String,
    pub ip: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct NodeContext {
    pub name: String,
    pub vmid: u32,
    pub proxmox_node: String,
    pub kind: &'static str,
    pub role: String,
    pub is_control_plane: bool,
    /// The first control plane node: K3s `cluster-init`, Talos bootstrap.
    pub is_first_control_plane: bool,
    pub address: String,
    pub ip: String,
    pub prefix: u8,
    pub cores: u32,
    pub sockets: u32,
    pub memory_mib: u64,
    pub swap_mib: u64,
    pub disk_gib: u64,
    pub storage: String,
    pub bridge: String,
    pub vlan: Option<u16>,
    pub template: Option<String>,
    pub image: Option<String>,
    pub onboot: bool,
    pub description: Option<String>,
    /// Lowercased, sorted, unique, with the ownership tag: as Proxmox stores them.
    pub tags: Vec<String>,
    pub labels: BTreeMap<String, String>,
    pub taints: Vec<String>,
    pub lxc: LxcContext,
    pub vm: VmContext,
    /// Extra K3s config keys from ADRs, defaults and the node file.
    pub k3s_config: BTreeMap<String, Json>,
    pub talos_install_disk: String,
    pub talos_install_image: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct LxcContext {
    pub arch: Option<String>,
    pub ostype: Option<String>,
    pub unprivileged: Option<bool>,
    /// `fuse=1,keyctl=1,nesting=1`, empty when no feature is set.
    pub features: String,
    /// Raw keys in order: `[[key, value], ...]`.
    pub raw: Vec<(String, String)>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct VmContext {
    pub cpu: Option<String>,
    pub machine: Option<String>,
    pub bios: Option<String>,
    pub ostype: Option<String>,
    pub scsihw: Option<String>,
    pub agent: Option<bool>,
    pub net_model: String,
}

pub fn cluster_context(d: &Desired) -> ClusterContext {
    let c = &d.cluster;
    let control_plane: Vec<PeerContext> = d
        .control_plane()
        .map(|n| PeerContext {
            name: n.name.clone(),
            ip: n.ip().to_string(),
        })
        .collect();
    let api_endpoint = c
        .talos
        .endpoint
        .clone()
        .filter(|_| c.distribution == Distribution::Talos)
        .unwrap_or_else(|| {
            format!(
                "https://{}:6443",
                control_plane.first().map(|p| p.ip.as_str()).unwrap_or("127.0.0.1")
            )
        });
    ClusterContext {
        name: c.name.clone(),
        distribution: c.distribution.as_str(),
        version: c.version.clone(),
        version_minor: c
            .version
            .trim_start_matches('v')
            .split('.')
            .nth(1)
            .and_then(|m| m.parse().ok())
            .unwrap_or(0),
        kubernetes_version: c.kubernetes_version.clone(),
        cni: c.cni.clone(),
        network: NetworkContext {
            cidr: c.network.cidr.to_string(),
            prefix: c.network.cidr.prefix_len(),
            gateway: c.network.gateway.to_string(),
            dns: c.network.dns.iter().map(ToString::to_string).collect(),
            search_domain: c.network.search_domain.clone(),
        },
        api_endpoint,
        control_plane,
        ownership_tag: c.reconcile.ownership_tag.clone(),
        has_token_secret: c.k3s.token.is_some(),
    }
}

pub fn node_context(d: &Desired, n: &Node) -> NodeContext {
    let s = &n.settings;
    let mut tags: Vec<String> = s.tags.iter().flatten().map(|t| t.to_ascii_lowercase()).collect();
    tags.push(d.cluster.reconcile.ownership_tag.to_ascii_lowercase());
    tags.sort();
    tags.dedup();
    let lxc = s.lxc.clone().unwrap_or_default();
    let features = lxc.features.clone().unwrap_or_default();
    let mut feature_pairs: Vec<(String, String)> = [
        ("nesting", features.nesting),
        ("keyctl", features.keyctl),
        ("fuse", features.fuse),
        ("mknod", features.mknod),
        ("force_rw_sys", features.force_rw_sys),
    ]
    .into_iter()
    .filter_map(|(k, v)| v.map(|v| (k.to_string(), if v { "1" } else { "0" }.to_string())))
    .collect();
    if let Some(m) = &features.mount {
        feature_pairs.push(("mount".into(), m.clone()));
    }
    feature_pairs.sort();
    let vm = s.vm.clone().unwrap_or_default();
    let first_cp = d.control_plane().next().map(|c| c.name.as_str());
    NodeContext {
        name: n.name.clone(),
        vmid: n.vmid,
        proxmox_node: n.proxmox_node.clone(),
        kind: n.kind.as_str(),
        role: n.role.clone(),
        is_control_plane: d.cluster.distribution.is_control_plane(&n.role),
        is_first_control_plane: first_cp == Some(n.name.as_str()),
        address: n.address.to_string(),
        ip: n.ip().to_string(),
        prefix: n.address.prefix_len(),
        cores: s.cores.unwrap_or(1),
        sockets: vm.sockets.unwrap_or(1),
        memory_mib: s.memory.map_or(1024, |m| m.mib),
        swap_mib: s.swap.map_or(0, |m| m.mib),
        disk_gib: s.disk.map_or(8, |m| m.gib()),
        storage: s.storage.clone().unwrap_or_else(|| "local-lvm".into()),
        bridge: s.bridge.clone().unwrap_or_else(|| "vmbr0".into()),
        vlan: s.vlan,
        template: s.template.clone(),
        image: s.image.clone(),
        onboot: s.onboot.unwrap_or(true),
        description: s.description.clone(),
        tags,
        labels: s.labels.clone().unwrap_or_default(),
        taints: s.taints.clone().unwrap_or_default(),
        lxc: if n.kind == GuestKind::Lxc {
            LxcContext {
                arch: lxc.arch.clone(),
                ostype: lxc.ostype.clone(),
                unprivileged: lxc.unprivileged,
                features: feature_pairs
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(","),
                raw: lxc
                    .raw
                    .iter()
                    .flatten()
                    .flat_map(|m| m.iter().map(|(k, v)| (k.clone(), v.text())))
                    .collect(),
            }
        } else {
            LxcContext::default()
        },
        vm: VmContext {
            cpu: vm.cpu,
            machine: vm.machine,
            bios: vm.bios,
            ostype: vm.ostype,
            scsihw: vm.scsihw,
            agent: vm.agent,
            net_model: vm.net_model.unwrap_or_else(|| "virtio".into()),
        },
        k3s_config: s.k3s.as_ref().and_then(|k| k.config.clone()).unwrap_or_default(),
        talos_install_disk: s
            .talos
            .as_ref()
            .and_then(|t| t.install_disk.clone())
            .unwrap_or_else(|| "/dev/sda".into()),
        // Set, its tag follows cluster.yaml's `version`, as the image an upgrade installs.
        talos_install_image: s
            .talos
            .as_ref()
            .and_then(|t| t.install_image.as_deref())
            .map(|_| n.talos_installer_image(&d.cluster.version)),
    }
}
