//! driftless's integration tests: one test binary, a module per area. They run the built
//! `driftless` binary, the sandbox (`driftless-sandbox`), the real git CLI and a real OpenSSH
//! server on loopback; what they share is the `testkit` crate (crates/testkit).
//!
//! Run them with `cargo test --workspace` (it builds both binaries first).

mod addons;
mod broken;
mod cli;
mod daemon;
mod daemon_git;
mod daemon_http;
mod daemon_replicas;
mod doctor;
mod e2e_cluster;
mod e2e_proxmox;
mod e2e_talos;
mod fault_matrix;
mod git_source;
mod import;
mod known_hosts;
mod kube_api;
mod parallel_apply;
mod proxmox_client;
mod render_snapshots;
mod sandbox_proxmox;
mod setup_guide;
mod ssh_host_shell;
mod ssh_node;
mod systemd_unit;
mod talos_api;
mod talos_schema;
mod verify;
