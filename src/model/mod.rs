//! The desired state: loading, ADR resolution, provenance and validation. Pure: no I/O, no clock.

pub mod adr;
pub(crate) mod desired;
pub mod diag;
pub(crate) mod files;
mod load;
pub mod schema;
mod validate;
pub(crate) mod yaml;

pub use desired::*;
pub use diag::{Diagnostic, Diagnostics, Location};
pub use files::RepoFiles;
pub use load::{LoadOptions, builtin_location, limits, load};
pub use validate::{parse_duration, valid_tag};
