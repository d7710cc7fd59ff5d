//! driftless: pull-based GitOps reconciler for Proxmox-hosted K3s and Talos homelabs.
//!
//! The pipeline, one module each: `source` (read a repository from a directory or git),
//! `model` (load, resolve ADRs, validate), `render` (artifacts from templates), `plan`
//! (desired vs observed), `apply` (run a plan through the ports), `daemon` (the loop).
//! docs/architecture.md describes how they fit.
//!
//! The core is pure: a repository in memory loads, validates and renders without I/O.
//!
//! ```
//! use driftless::model::{LoadOptions, RepoFiles, load};
//! use driftless::render::{ArtifactKind, render_all};
//!
//! let mut files = RepoFiles::new("memory");
//! files.insert("cluster.yaml", "name: lab\ndistribution: k3s\nversion: v1.31.4+k3s1\n\
//!     proxmox: {api: \"https://10.0.0.2:8006\"}\n\
//!     network: {cidr: 10.0.0.0/24, gateway: 10.0.0.1}\n\
//!     defaults: {lxc: {template: \"local:vztmpl/ubuntu.tar.zst\"}}\n");
//! files.insert("nodes/k3s-1.yaml", "vmid: 100\nproxmox_node: pve\nkind: lxc\nrole: server\naddress: 10.0.0.10/24\ncores: 2\n");
//! let desired = load(&files, &LoadOptions::default()).expect("valid");
//! assert_eq!(desired.nodes[0].provenance["cores"].cite(), "nodes/k3s-1.yaml:6");
//! let artifacts = render_all(&desired).expect("renders");
//! let conf = artifacts.iter().find(|a| a.kind == ArtifactKind::ProxmoxConf).unwrap();
//! assert!(conf.content.contains("cores: 2\nhostname: k3s-1\n"));
//! ```
pub mod adapters;
pub mod addons;
pub mod apply;
pub mod cluster;
pub mod connect;
pub mod daemon;
pub mod doctor;
pub mod hostshell;
pub mod import;
pub mod model;
pub mod pki;
pub mod plan;
pub mod ports;
pub mod pve;
pub mod reconcile;
pub mod render;
pub mod runtime;
pub mod secrets;
pub mod settings;
pub mod source;
#[cfg(test)]
mod test_repo;
mod threads;
