//! The cluster layer: K3s and Talos on the nodes, Kubernetes health gates.

pub mod access;
pub mod health;
pub mod k3s;
pub mod node_access;
pub mod plan;
pub mod talos_secrets;
