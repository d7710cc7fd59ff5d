//! driftless: pull-based GitOps reconciler for Proxmox-hosted K3s and Talos homelabs.
//!
//! The pipeline, one module each: `model` (load, resolve ADRs, validate), `render`
//! (artifacts from templates), `source` (read a repository from a directory or git).
pub mod adapters;
pub mod apply;
pub mod cli;
pub mod commands;
pub mod connect;
pub mod daemon;
pub mod hostshell;
pub mod model;
pub mod plan;
pub mod ports;
pub mod pve;
pub mod quickstart;
pub mod render;
pub mod sandbox;
pub mod secrets;
pub mod source;
