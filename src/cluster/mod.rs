//! The cluster layer: K3s and Talos on the nodes, Kubernetes health gates.

pub(crate) mod access;
pub(crate) mod health;
pub mod k3s;
pub mod node_access;
pub(crate) mod plan;
pub mod talos_secrets;
