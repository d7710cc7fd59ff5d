//! The few Talos API messages driftless sends and reads, written by hand as prost structs (no
//! protoc at build time). Field numbers and enum values are Talos's, checked against
//! `api/common/common.proto` (siderolabs/talos @ 0f169bf9) and `api/machine/machine.proto`
//! (siderolabs/talos v1.x, as in the fork dsseng/talos @ 95c807b6; the older tree's
//! `on_reboot = 2` / `immediate = 3` are gone, which is why `mode` is 4). What answers look
//! like (dry-run summaries, AlreadyExists, the kubeconfig archive) was checked against machined's
//! `internal/app/machined/internal/server/v1alpha1/v1alpha1_server.go` and its maintenance
//! service. The messages:
//!
//! ```text
//! common.Metadata        { string hostname = 1; string error = 2; google.rpc.Status status = 3; }
//! common.Data            { Metadata metadata = 1; bytes bytes = 2; }
//! google.rpc.Status      { int32 code = 1; string message = 2; repeated Any details = 3; }
//! google.protobuf.Duration { int64 seconds = 1; int32 nanos = 2; }
//! machine.ApplyConfigurationRequest {
//!   enum Mode { REBOOT = 0; AUTO = 1; NO_REBOOT = 2; STAGED = 3; TRY = 4; }
//!   bytes data = 1; Mode mode = 4; bool dry_run = 5; google.protobuf.Duration try_mode_timeout = 6;
//! }   // 2 and 3 were on_reboot / immediate, removed
//! machine.ApplyConfiguration { common.Metadata metadata = 1; repeated string warnings = 2;
//!                              ApplyConfigurationRequest.Mode mode = 3; string mode_details = 4; }
//! machine.ApplyConfigurationResponse { repeated ApplyConfiguration messages = 1; }
//! machine.BootstrapRequest  { bool recover_etcd = 1; bool recover_skip_hash_check = 2; }
//! machine.Bootstrap         { common.Metadata metadata = 1; }
//! machine.BootstrapResponse { repeated Bootstrap messages = 1; }
//! machine.Version           { common.Metadata metadata = 1; VersionInfo version = 2;
//!                             PlatformInfo platform = 3; FeaturesInfo features = 4; }
//! machine.VersionResponse   { repeated Version messages = 1; }
//! machine.VersionInfo       { string tag = 1; string sha = 2; string built = 3;
//!                             string go_version = 4; string os = 5; string arch = 6; }
//! machine.PlatformInfo      { string name = 1; string mode = 2; }
//! machine.UpgradeRequest    { enum RebootMode { DEFAULT = 0; POWERCYCLE = 1; }
//!                             string image = 1; bool preserve = 2; bool stage = 3; bool force = 4;
//!                             RebootMode reboot_mode = 5; }
//! machine.Upgrade           { common.Metadata metadata = 1; string ack = 2; string actor_id = 3; }
//! machine.UpgradeResponse   { repeated Upgrade messages = 1; }
//! rpc Version(google.protobuf.Empty) returns (VersionResponse);
//! rpc Upgrade(UpgradeRequest) returns (UpgradeResponse);   // answers, then installs and reboots
//! rpc Kubeconfig(google.protobuf.Empty) returns (stream common.Data);   // a .tar.gz holding `kubeconfig`
//! ```
//!
//! `features` (4) of `Version` and `details` of `google.rpc.Status` are left out: prost skips
//! fields it does not know.

use std::fmt;

/// The gRPC service and method paths.
pub const SERVICE: &str = "machine.MachineService";
pub const APPLY_CONFIGURATION: &str = "/machine.MachineService/ApplyConfiguration";
pub const BOOTSTRAP: &str = "/machine.MachineService/Bootstrap";
pub const KUBECONFIG: &str = "/machine.MachineService/Kubeconfig";
pub const VERSION: &str = "/machine.MachineService/Version";
pub const UPGRADE: &str = "/machine.MachineService/Upgrade";

/// `google.protobuf.Empty`.
#[derive(Clone, PartialEq, ::prost::Message)]
pub struct Empty {}

/// `google.rpc.Status` (without `details`).
#[derive(Clone, PartialEq, ::prost::Message)]
pub struct RpcStatus {
    #[prost(int32, tag = "1")]
    pub code: i32,
    #[prost(string, tag = "2")]
    pub message: ::prost::alloc::string::String,
}

/// `google.protobuf.Duration`.
#[derive(Clone, Copy, PartialEq, ::prost::Message)]
pub struct Duration {
    #[prost(int64, tag = "1")]
    pub seconds: i64,
    #[prost(int32, tag = "2")]
    pub nanos: i32,
}

/// `common.Metadata`: which node answered, and its error when the proxy could not reach it.
#[derive(Clone, PartialEq, ::prost::Message)]
pub struct Metadata {
    #[prost(string, tag = "1")]
    pub hostname: ::prost::alloc::string::String,
    #[prost(string, tag = "2")]
    pub error: ::prost::alloc::string::String,
    #[prost(message, optional, tag = "3")]
    pub status: ::core::option::Option<RpcStatus>,
}

/// `common.Data`.
#[derive(Clone, PartialEq, ::prost::Message)]
pub struct Data {
    #[prost(message, optional, tag = "1")]
    pub metadata: ::core::option::Option<Metadata>,
    #[prost(bytes = "vec", tag = "2")]
    pub bytes: ::prost::alloc::vec::Vec<u8>,
}

/// `machine.ApplyConfigurationRequest.Mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, ::prost::Enumeration)]
#[repr(i32)]
pub enum ApplyMode {
    Reboot = 0,
    Auto = 1,
    NoReboot = 2,
    Staged = 3,
    Try = 4,
}

impl ApplyMode {
    /// As talosctl's `--mode` spells it.
    pub fn flag(self) -> &'static str {
        match self {
            ApplyMode::Reboot => "reboot",
            ApplyMode::Auto => "auto",
            ApplyMode::NoReboot => "no-reboot",
            ApplyMode::Staged => "staged",
            ApplyMode::Try => "try",
        }
    }

    /// As the enum value is named in the proto (`NO_REBOOT`).
    pub fn proto_name(self) -> &'static str {
        match self {
            ApplyMode::Reboot => "REBOOT",
            ApplyMode::Auto => "AUTO",
            ApplyMode::NoReboot => "NO_REBOOT",
            ApplyMode::Staged => "STAGED",
            ApplyMode::Try => "TRY",
        }
    }
}

/// `machine.ApplyConfigurationRequest`. `Debug` shows the size of the config, not the config
/// (it carries the cluster's secrets).
#[derive(Clone, PartialEq, ::prost::Message)]
#[prost(skip_debug)]
pub struct ApplyConfigurationRequest {
    #[prost(bytes = "vec", tag = "1")]
    pub data: ::prost::alloc::vec::Vec<u8>,
    #[prost(enumeration = "ApplyMode", tag = "4")]
    pub mode: i32,
    #[prost(bool, tag = "5")]
    pub dry_run: bool,
    #[prost(message, optional, tag = "6")]
    pub try_mode_timeout: ::core::option::Option<Duration>,
}

impl fmt::Debug for ApplyConfigurationRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApplyConfigurationRequest")
            .field("data", &format_args!("<{} bytes>", self.data.len()))
            .field("mode", &ApplyMode::try_from(self.mode).map(ApplyMode::flag))
            .field("dry_run", &self.dry_run)
            .field("try_mode_timeout", &self.try_mode_timeout)
            .finish()
    }
}

/// `machine.ApplyConfiguration`: one node's answer.
#[derive(Clone, PartialEq, ::prost::Message)]
pub struct ApplyConfiguration {
    #[prost(message, optional, tag = "1")]
    pub metadata: ::core::option::Option<Metadata>,
    #[prost(string, repeated, tag = "2")]
    pub warnings: ::prost::alloc::vec::Vec<::prost::alloc::string::String>,
    #[prost(enumeration = "ApplyMode", tag = "3")]
    pub mode: i32,
    #[prost(string, tag = "4")]
    pub mode_details: ::prost::alloc::string::String,
}

#[derive(Clone, PartialEq, ::prost::Message)]
pub struct ApplyConfigurationResponse {
    #[prost(message, repeated, tag = "1")]
    pub messages: ::prost::alloc::vec::Vec<ApplyConfiguration>,
}

#[derive(Clone, PartialEq, ::prost::Message)]
pub struct BootstrapRequest {
    #[prost(bool, tag = "1")]
    pub recover_etcd: bool,
    #[prost(bool, tag = "2")]
    pub recover_skip_hash_check: bool,
}

#[derive(Clone, PartialEq, ::prost::Message)]
pub struct Bootstrap {
    #[prost(message, optional, tag = "1")]
    pub metadata: ::core::option::Option<Metadata>,
}

#[derive(Clone, PartialEq, ::prost::Message)]
pub struct BootstrapResponse {
    #[prost(message, repeated, tag = "1")]
    pub messages: ::prost::alloc::vec::Vec<Bootstrap>,
}

#[derive(Clone, PartialEq, ::prost::Message)]
pub struct VersionInfo {
    #[prost(string, tag = "1")]
    pub tag: ::prost::alloc::string::String,
    #[prost(string, tag = "2")]
    pub sha: ::prost::alloc::string::String,
    #[prost(string, tag = "3")]
    pub built: ::prost::alloc::string::String,
    #[prost(string, tag = "4")]
    pub go_version: ::prost::alloc::string::String,
    #[prost(string, tag = "5")]
    pub os: ::prost::alloc::string::String,
    #[prost(string, tag = "6")]
    pub arch: ::prost::alloc::string::String,
}

#[derive(Clone, PartialEq, ::prost::Message)]
pub struct PlatformInfo {
    #[prost(string, tag = "1")]
    pub name: ::prost::alloc::string::String,
    #[prost(string, tag = "2")]
    pub mode: ::prost::alloc::string::String,
}

#[derive(Clone, PartialEq, ::prost::Message)]
pub struct Version {
    #[prost(message, optional, tag = "1")]
    pub metadata: ::core::option::Option<Metadata>,
    #[prost(message, optional, tag = "2")]
    pub version: ::core::option::Option<VersionInfo>,
    #[prost(message, optional, tag = "3")]
    pub platform: ::core::option::Option<PlatformInfo>,
}

#[derive(Clone, PartialEq, ::prost::Message)]
pub struct VersionResponse {
    #[prost(message, repeated, tag = "1")]
    pub messages: ::prost::alloc::vec::Vec<Version>,
}

/// `machine.UpgradeRequest` (`reboot_mode` 0, DEFAULT: a kexec or reboot as Talos chooses).
#[derive(Clone, PartialEq, ::prost::Message)]
pub struct UpgradeRequest {
    #[prost(string, tag = "1")]
    pub image: ::prost::alloc::string::String,
    #[prost(bool, tag = "2")]
    pub preserve: bool,
    #[prost(bool, tag = "3")]
    pub stage: bool,
    #[prost(bool, tag = "4")]
    pub force: bool,
    #[prost(int32, tag = "5")]
    pub reboot_mode: i32,
}

/// `machine.Upgrade`: one node's acknowledgement; the upgrade itself runs after it.
#[derive(Clone, PartialEq, ::prost::Message)]
pub struct Upgrade {
    #[prost(message, optional, tag = "1")]
    pub metadata: ::core::option::Option<Metadata>,
    #[prost(string, tag = "2")]
    pub ack: ::prost::alloc::string::String,
    #[prost(string, tag = "3")]
    pub actor_id: ::prost::alloc::string::String,
}

#[derive(Clone, PartialEq, ::prost::Message)]
pub struct UpgradeResponse {
    #[prost(message, repeated, tag = "1")]
    pub messages: ::prost::alloc::vec::Vec<Upgrade>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message as _;

    #[test]
    fn wire_format_uses_talos_field_numbers() {
        let req = ApplyConfigurationRequest {
            data: b"x".to_vec(),
            mode: ApplyMode::NoReboot as i32,
            dry_run: true,
            try_mode_timeout: Some(Duration { seconds: 60, nanos: 0 }),
        };
        // data = 1 (bytes), mode = 4 (varint 2), dry_run = 5 (varint 1), try_mode_timeout = 6 { seconds = 1 }
        assert_eq!(
            req.encode_to_vec(),
            [0x0a, 0x01, b'x', 0x20, 0x02, 0x28, 0x01, 0x32, 0x02, 0x08, 0x3c]
        );
        let answer = ApplyConfiguration {
            metadata: Some(Metadata {
                hostname: "n".into(),
                error: String::new(),
                status: None,
            }),
            warnings: vec!["w".into()],
            mode: ApplyMode::Staged as i32,
            mode_details: "d".into(),
        };
        assert_eq!(
            answer.encode_to_vec(),
            [
                0x0a, 0x03, 0x0a, 0x01, b'n', 0x12, 0x01, b'w', 0x18, 0x03, 0x22, 0x01, b'd'
            ]
        );
        let upgrade = UpgradeRequest {
            image: "i".into(),
            preserve: false,
            stage: false,
            force: true,
            reboot_mode: 1,
        };
        // image = 1, force = 4 (varint 1), reboot_mode = 5 (varint 1); false fields are not sent.
        assert_eq!(upgrade.encode_to_vec(), [0x0a, 0x01, b'i', 0x20, 0x01, 0x28, 0x01]);
        let debug = format!("{req:?}");
        assert!(debug.contains("<1 bytes>") && debug.contains("no-reboot"), "{debug}");
    }
}
