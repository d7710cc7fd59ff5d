//! The cluster layer: K3s and Talos on the nodes, Kubernetes health gates.

pub mod talos_secrets;
