//! Kubernetes API adapter (kube-rs): to be written.
