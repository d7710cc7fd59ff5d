//! The daemon's git layer (blocking; the daemon calls it in `spawn_blocking`), one concern a
//! file:
//!
//! - `auth.rs`: how the daemon authenticates to the remote ([`GitAuth`]: ssh key,
//!   known_hosts, token file), as gix config overrides and as the git CLI's environment.
//! - `mirror.rs`: [`Mirror`], a local bare mirror of the watched repository in a cache
//!   directory, fetched with gix (no checkout), whose refs and commit trees the daemon reads.
//! - `cli.rs`: the one function that runs the git CLI (fixed environment, timeout, errors
//!   that name the command and end with git's own words).
//! - `status_branch.rs`: status reports as commits on a branch of their own, made with git
//!   plumbing and pushed with the git CLI (gix cannot push), never forced.
//! - `error.rs`: [`GitError`], and keeping secrets out of it.
//!
//! Secrets never reach errors or logs: error text is redacted of the token, the header and any
//! password in a URL.

mod auth;
mod cli;
mod error;
mod mirror;
mod status_branch;

pub use auth::GitAuth;
pub use cli::{COMMIT_EMAIL, COMMIT_NAME};
pub use error::{GitError, display_url};
pub use mirror::{DEFAULT_REFSPEC, DEFAULT_TIMEOUT, Mirror, glob_match};
pub use status_branch::{DEFAULT_STATUS_BRANCH, PUSH_ATTEMPTS};
