//! The simulated Kubernetes API: to be written.
