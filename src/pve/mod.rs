//! Proxmox VE formats and API schema (pure: no I/O, no clock).
//!
//! * [`conf`]: guest config files (`lxc/VMID.conf`, `qemu-server/VMID.conf`): parse,
//!   write byte-for-byte as Proxmox does, digest, property strings.
//! * [`lxc_keys`]: the raw `lxc.*` key allow-list of pve-container.
//! * [`api_schema`]: request parameter validation against the official API schema
//!   (the endpoints driftless uses), with Proxmox's error messages.

pub mod api_schema;
pub mod conf;
pub(crate) mod lxc_keys;

pub use api_schema::{ApiSchema, Endpoint, ParamErrors, RequestError};
pub use conf::{ConfError, GuestConf, PveKind, Section};
pub use lxc_keys::{RawKeyVerdict, check_raw_key, is_valid_raw_key};
