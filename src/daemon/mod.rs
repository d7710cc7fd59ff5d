pub mod config;
pub mod decide;
pub mod forge;
pub mod git;
pub mod memory;
pub mod metrics;
pub mod run;
pub mod server;
pub mod status;
pub mod webhook;
pub mod worker;

/// The git layer's former name, kept so that callers (and `tests/daemon_git.rs`) need not
/// change while the rest of the crate is being restructured; new code uses [`git`].
pub use git as gitops;
