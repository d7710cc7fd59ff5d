//! The Talos API over gRPC, as talosctl speaks it: [`TalosClient`] implements
//! [`ports::TalosApi`](crate::ports::TalosApi).
//!
//! * Credentials come from a talosconfig ([`TalosClient::from_talosconfig`]): the current
//!   context's first endpoint (port 50000 unless given), its CA (the only trust root: the
//!   server's certificate must chain to it and name the endpoint) and the client certificate.
//! * Every request carries the gRPC metadata `node: <address>` (what `talosctl -n` sends), so
//!   one endpoint reaches every node through apid's proxy.
//! * [`probe`](TalosClient::probe) asks the node's own address (`<node>:50000`; the override
//!   with the `node` metadata when one is set, as in the sandbox) what it is:
//!   - it answers over mTLS with a certificate the cluster CA signed: configured (or in
//!     maintenance mode, when that trusted server says so);
//!   - its certificate is not the cluster CA's, and without a client certificate it answers
//!     exactly as Talos's maintenance service does (Version: Unimplemented "API is not
//!     implemented in maintenance mode"): maintenance mode;
//!   - anything else: `TalosError::Untrusted`, naming the node and saying that the cluster CA
//!     did not sign its certificate. Whatever answers there is sent nothing.
//! * A node in maintenance mode has no trust to pin yet: a config goes to it without a client
//!   certificate and without verifying its certificate (only the handshake signature), as
//!   `talosctl apply-config --insecure` does, only for `apply_configuration(.., maintenance:
//!   true)`, with a warning. The cluster layer decides when that is allowed (a VM this run
//!   created, or a node file that says so): nothing tells a real maintenance-mode node from a
//!   machine imitating one.
//! * TLS is done here (rustls, aws-lc-rs) and the stream handed to tonic: tonic's own TLS
//!   settings can neither pin a single CA for an IP endpoint nor skip verification.
//!
//! Errors: a gRPC status becomes `TalosError::Api` with the code as gRPC names it
//! (`InvalidArgument`), so does a `metadata.error` in an answer; a server certificate the
//! cluster CA does not accept `TalosError::Untrusted`; other connection and TLS failures
//! `TalosError::Transport`. Nothing here prints the client key.

pub mod proto;

use std::collections::BTreeMap;
use std::error::Error as StdError;
use std::fmt;
use std::io::Read as _;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use rustls::{CertificateError, ClientConfig, RootCertStore};
use serde::Deserialize;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic_prost::ProstCodec;

use crate::adapters::tls::{AnyServerCert, crypto_provider, error_chain};
use crate::pki;
use crate::ports::{TalosApi, TalosApplyMode, TalosApplyResult, TalosError, TalosNodeState};

/// apid's port.
pub const DEFAULT_PORT: u16 = 50000;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const CALL_TIMEOUT: Duration = Duration::from_secs(120);
/// The words Talos's maintenance service answers most calls with.
const MAINTENANCE_MESSAGE: &str = "not implemented in maintenance mode";

/// A Talos API client for one talosconfig context.
#[derive(Clone)]
pub struct TalosClient {
    context: String,
    /// `host:port` of the endpoint every mTLS request goes to.
    endpoint: String,
    /// Set when the endpoint was overridden: maintenance-mode requests go there too.
    endpoint_override: bool,
    mtls: Arc<ClientConfig>,
    insecure: Arc<ClientConfig>,
}

impl fmt::Debug for TalosClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TalosClient")
            .field("context", &self.context)
            .field("endpoint", &self.endpoint)
            .field("endpoint_override", &self.endpoint_override)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct TalosconfigFile {
    #[serde(default)]
    context: Option<String>,
    #[serde(default)]
    contexts: BTreeMap<String, TalosconfigContext>,
}

#[derive(Deserialize)]
struct TalosconfigContext {
    #[serde(default)]
    endpoints: Vec<String>,
    #[serde(default)]
    ca: Option<String>,
    #[serde(default)]
    crt: Option<String>,
    #[serde(default)]
    key: Option<String>,
}

fn other(message: impl Into<String>) -> TalosError {
    TalosError::Other(message.into())
}

impl TalosClient {
    /// From a talosconfig: its current context (or its only one), the first endpoint
    /// (`endpoint_override` instead when given: `HOST[:PORT]`), the CA and client certificate.
    pub fn from_talosconfig(yaml: &[u8], endpoint_override: Option<&str>) -> Result<TalosClient, TalosError> {
        let file: TalosconfigFile = yaml_serde::from_slice(yaml).map_err(|e| {
            other(match e.location() {
                Some(l) => format!(
                    "the talosconfig is not valid YAML (line {}, column {})",
                    l.line(),
                    l.column()
                ),
                None => "the talosconfig is not valid YAML".to_string(),
            })
        })?;
        let name = match (&file.context, file.contexts.len()) {
            (Some(c), _) if !c.is_empty() => c.clone(),
            (_, 1) => file.contexts.keys().next().expect("one context").clone(),
            _ => return Err(other("the talosconfig names no current context")),
        };
        let ctx = file
            .contexts
            .get(&name)
            .ok_or_else(|| other(format!("the talosconfig has no context `{name}`")))?;
        let endpoint = match endpoint_override {
            Some(e) => e.to_string(),
            None => ctx
                .endpoints
                .first()
                .cloned()
                .ok_or_else(|| other(format!("talosconfig context `{name}` has no endpoints")))?,
        };
        let endpoint = with_default_port(&endpoint);
        let pem = |field: &str, value: &Option<String>| -> Result<String, TalosError> {
            let value = value
                .as_deref()
                .filter(|v| !v.is_empty())
                .ok_or_else(|| other(format!("talosconfig context `{name}` has no `{field}`")))?;
            pki::decode_base64_pem(value).ok_or_else(|| {
                other(format!(
                    "talosconfig context `{name}`: `{field}` is not base64-encoded PEM"
                ))
            })
        };
        let ca = pem("ca", &ctx.ca)?;
        let crt = pem("crt", &ctx.crt)?;
        let key = pem("key", &ctx.key)?;

        let provider = crypto_provider();
        let mut roots = RootCertStore::empty();
        let ca =
            pki::certificates(ca.as_bytes()).map_err(|e| other(format!("talosconfig context `{name}`: `ca` {e}")))?;
        for cert in ca {
            roots
                .add(cert)
                .map_err(|e| other(format!("talosconfig context `{name}`: the CA is unusable: {e}")))?;
        }
        let chain =
            pki::certificates(crt.as_bytes()).map_err(|e| other(format!("talosconfig context `{name}`: `crt` {e}")))?;
        let key = pki::private_key(key.as_bytes())
            .map_err(|_| other(format!("talosconfig context `{name}`: `key` is not a private key")))?;
        let mut mtls = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| other(format!("TLS setup: {e}")))?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|e| {
                other(format!(
                    "talosconfig context `{name}`: the client certificate is unusable: {e}"
                ))
            })?;
        mtls.alpn_protocols = vec![b"h2".to_vec()];
        let mut insecure = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| other(format!("TLS setup: {e}")))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyServerCert::new(&provider)))
            .with_no_client_auth();
        insecure.alpn_protocols = vec![b"h2".to_vec()];
        Ok(TalosClient {
            context: name,
            endpoint,
            endpoint_override: endpoint_override.is_some(),
            mtls: Arc::new(mtls),
            insecure: Arc::new(insecure),
        })
    }

    /// `host:port` every mTLS request goes to.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    pub fn context(&self) -> &str {
        &self.context
    }

    fn mtls_target(&self, node: &str) -> Target {
        Target {
            addr: self.endpoint.clone(),
            tls: self.mtls.clone(),
            node: Some(node.to_string()),
        }
    }

    /// Where a probe asks: the node's own address, so that the certificate checked is the one
    /// answering there; the override with the `node` metadata when one is set.
    fn probe_target(&self, node: &str, tls: &Arc<ClientConfig>) -> Target {
        if self.endpoint_override {
            Target {
                addr: self.endpoint.clone(),
                tls: tls.clone(),
                node: Some(node.to_string()),
            }
        } else {
            Target {
                addr: with_default_port(node),
                tls: tls.clone(),
                node: None,
            }
        }
    }

    /// A config for a node in maintenance mode: its certificate is not verified.
    fn maintenance_target(&self, node: &str) -> Target {
        tracing::warn!(
            node,
            "sending a Talos machine config in maintenance mode, without a client certificate and \
             without verifying the node's certificate (as talosctl --insecure): there is no trust to pin yet"
        );
        self.probe_target(node, &self.insecure)
    }

    async fn version(&self, target: &Target) -> Result<proto::VersionResponse, CallError> {
        let channel = connect(target).await?;
        unary(channel, target, proto::VERSION, proto::Empty {}).await
    }

    async fn probe_inner(&self, node: &str) -> Result<TalosNodeState, TalosError> {
        match self.version(&self.probe_target(node, &self.mtls)).await {
            Ok(resp) => match first_metadata_error(resp.messages.iter().map(|m| m.metadata.as_ref())) {
                None => {
                    let tag = resp
                        .messages
                        .first()
                        .and_then(|m| m.version.as_ref())
                        .map(|v| v.tag.clone())
                        .unwrap_or_default();
                    Ok(TalosNodeState::Configured { version: tag })
                }
                // A server the cluster CA signed says the node has no config yet.
                Some((_, message)) if message.contains(MAINTENANCE_MESSAGE) => Ok(TalosNodeState::Maintenance),
                Some((code, message)) => Err(TalosError::Api {
                    node: node.to_string(),
                    code,
                    message,
                }),
            },
            Err(CallError::Status(s)) if is_maintenance_answer(&s) => Ok(TalosNodeState::Maintenance),
            Err(e) => match e.server_certificate_refused() {
                Some(refused) => self.probe_untrusted(node, &refused).await,
                None => Err(e.into_talos(node)),
            },
        }
    }

    /// The node's address answered with a certificate the cluster CA does not accept: Talos's
    /// maintenance service, or not the cluster's node at all. Only a Version request without
    /// client certificate is sent to tell.
    async fn probe_untrusted(&self, node: &str, refused: &rustls::Error) -> Result<TalosNodeState, TalosError> {
        let how = match self.version(&self.probe_target(node, &self.insecure)).await {
            Err(CallError::Status(s)) if is_maintenance_answer(&s) => return Ok(TalosNodeState::Maintenance),
            // Talos answers Version in maintenance mode to SideroLink peers only.
            Ok(_) => "it answers a Version request without a client certificate, which Talos's maintenance \
                      service does not"
                .to_string(),
            Err(e) => format!(
                "it does not answer as Talos's maintenance service does ({})",
                e.detail()
            ),
        };
        Err(TalosError::Untrusted {
            node: node.to_string(),
            message: format!("{}, and {how}", refused_certificate(refused)),
        })
    }

    async fn apply_inner(
        &self,
        node: &str,
        config: &[u8],
        mode: TalosApplyMode,
        dry_run: bool,
        maintenance: bool,
    ) -> Result<TalosApplyResult, CallError> {
        let target = if maintenance {
            self.maintenance_target(node)
        } else {
            self.mtls_target(node)
        };
        let request = proto::ApplyConfigurationRequest {
            data: config.to_vec(),
            mode: proto_mode(mode) as i32,
            dry_run,
            try_mode_timeout: None,
        };
        let channel = connect(&target).await?;
        let resp: proto::ApplyConfigurationResponse =
            unary(channel, &target, proto::APPLY_CONFIGURATION, request).await?;
        if let Some((code, message)) = first_metadata_error(resp.messages.iter().map(|m| m.metadata.as_ref())) {
            return Err(CallError::Metadata { code, message });
        }
        let answer = resp.messages.into_iter().next().unwrap_or_default();
        Ok(TalosApplyResult {
            mode: proto::ApplyMode::try_from(answer.mode)
                .map(proto::ApplyMode::flag)
                .unwrap_or("unknown")
                .to_string(),
            mode_details: answer.mode_details,
            warnings: answer.warnings,
        })
    }

    async fn bootstrap_inner(&self, node: &str) -> Result<bool, CallError> {
        let target = self.mtls_target(node);
        let channel = connect(&target).await?;
        let request = proto::BootstrapRequest {
            recover_etcd: false,
            recover_skip_hash_check: false,
        };
        match unary::<_, proto::BootstrapResponse>(channel, &target, proto::BOOTSTRAP, request).await {
            Ok(resp) => match first_metadata_error(resp.messages.iter().map(|m| m.metadata.as_ref())) {
                None => Ok(true),
                Some((code, _)) if code == "AlreadyExists" => Ok(false),
                Some((code, message)) => Err(CallError::Metadata { code, message }),
            },
            // machined: `status.Error(codes.AlreadyExists, "etcd data directory is not empty")`.
            Err(CallError::Status(s)) if s.code() == tonic::Code::AlreadyExists => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// `talosctl upgrade --image IMAGE` without `--wait`: Talos acknowledges, then pulls the
    /// installer, installs it and reboots; the caller watches Version for the new tag.
    async fn upgrade_inner(&self, node: &str, image: &str) -> Result<String, CallError> {
        let target = self.mtls_target(node);
        let channel = connect(&target).await?;
        let request = proto::UpgradeRequest {
            image: image.to_string(),
            preserve: false,
            stage: false,
            force: false,
            reboot_mode: 0,
        };
        let resp: proto::UpgradeResponse = unary(channel, &target, proto::UPGRADE, request).await?;
        if let Some((code, message)) = first_metadata_error(resp.messages.iter().map(|m| m.metadata.as_ref())) {
            return Err(CallError::Metadata { code, message });
        }
        Ok(resp.messages.into_iter().next().map(|m| m.ack).unwrap_or_default())
    }

    async fn kubeconfig_inner(&self, node: &str) -> Result<Vec<u8>, CallError> {
        let target = self.mtls_target(node);
        let channel = connect(&target).await?;
        let mut grpc = tonic::client::Grpc::new(channel);
        grpc.ready().await.map_err(|e| CallError::connect(&target, &e))?;
        let codec: ProstCodec<proto::Empty, proto::Data> = ProstCodec::default();
        let call = async {
            let mut stream = grpc
                .server_streaming(
                    request(&target, proto::Empty {})?,
                    PathAndQuery::from_static(proto::KUBECONFIG),
                    codec,
                )
                .await
                .map_err(CallError::Status)?
                .into_inner();
            let mut archive = Vec::new();
            while let Some(chunk) = stream.message().await.map_err(CallError::Status)? {
                if let Some((code, message)) = first_metadata_error(std::iter::once(chunk.metadata.as_ref())) {
                    return Err(CallError::Metadata { code, message });
                }
                archive.extend_from_slice(&chunk.bytes);
            }
            Ok(archive)
        };
        let archive = tokio::time::timeout(CALL_TIMEOUT, call)
            .await
            .map_err(|_| CallError::Timeout)??;
        kubeconfig_from_archive(&archive).map_err(|message| CallError::Metadata {
            code: "DataLoss".into(),
            message,
        })
    }
}

impl TalosApi for TalosClient {
    async fn probe(&self, node: &str) -> Result<TalosNodeState, TalosError> {
        self.probe_inner(node).await
    }

    async fn apply_configuration(
        &self,
        node: &str,
        config: &[u8],
        mode: TalosApplyMode,
        dry_run: bool,
        maintenance: bool,
    ) -> Result<TalosApplyResult, TalosError> {
        self.apply_inner(node, config, mode, dry_run, maintenance)
            .await
            .map_err(|e| e.into_talos(node))
    }

    async fn bootstrap(&self, node: &str) -> Result<bool, TalosError> {
        self.bootstrap_inner(node).await.map_err(|e| e.into_talos(node))
    }

    async fn kubeconfig(&self, node: &str) -> Result<Vec<u8>, TalosError> {
        self.kubeconfig_inner(node).await.map_err(|e| e.into_talos(node))
    }

    async fn upgrade(&self, node: &str, image: &str) -> Result<String, TalosError> {
        self.upgrade_inner(node, image).await.map_err(|e| e.into_talos(node))
    }
}

fn proto_mode(mode: TalosApplyMode) -> proto::ApplyMode {
    match mode {
        TalosApplyMode::Auto => proto::ApplyMode::Auto,
        TalosApplyMode::NoReboot => proto::ApplyMode::NoReboot,
        TalosApplyMode::Reboot => proto::ApplyMode::Reboot,
        TalosApplyMode::Staged => proto::ApplyMode::Staged,
        TalosApplyMode::Try => proto::ApplyMode::Try,
    }
}

/// The first `metadata.error` of an answer: (gRPC code name, message).
fn first_metadata_error<'a>(metadata: impl Iterator<Item = Option<&'a proto::Metadata>>) -> Option<(String, String)> {
    metadata.flatten().find(|m| !m.error.is_empty()).map(|m| {
        let code = m
            .status
            .as_ref()
            .map(|s| code_name(tonic::Code::from_i32(s.code)))
            .unwrap_or_else(|| "Unknown".to_string());
        (code, m.error.clone())
    })
}

/// `InvalidArgument`, `AlreadyExists`, ...: the code as gRPC names it.
pub fn code_name(code: tonic::Code) -> String {
    format!("{code:?}")
}

/// The `kubeconfig` file of the gzipped tar Talos streams back.
pub fn kubeconfig_from_archive(archive: &[u8]) -> Result<Vec<u8>, String> {
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(archive));
    let entries = tar
        .entries()
        .map_err(|e| format!("the kubeconfig archive is unreadable: {e}"))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| format!("the kubeconfig archive is unreadable: {e}"))?;
        let is_kubeconfig = entry
            .path()
            .map(|p| p.file_name().is_some_and(|n| n == "kubeconfig"))
            .unwrap_or(false);
        if is_kubeconfig {
            let mut out = Vec::new();
            entry
                .read_to_end(&mut out)
                .map_err(|e| format!("the kubeconfig archive is unreadable: {e}"))?;
            return Ok(out);
        }
    }
    Err("the archive Talos sent holds no kubeconfig".into())
}

/// `HOST` -> `HOST:50000`; `HOST:PORT` and `[V6]:PORT` as given; a bare IPv6 address bracketed.
fn with_default_port(endpoint: &str) -> String {
    let e = endpoint
        .trim()
        .trim_start_matches("https://")
        .trim_start_matches("tcp://")
        .trim_end_matches('/');
    if e.parse::<IpAddr>().is_ok_and(|ip| ip.is_ipv6()) {
        return format!("[{e}]:{DEFAULT_PORT}");
    }
    if let Some(rest) = e.strip_prefix('[') {
        return if rest.contains("]:") {
            e.to_string()
        } else {
            format!("{e}:{DEFAULT_PORT}")
        };
    }
    if e.rsplit_once(':').is_some_and(|(_, port)| port.parse::<u16>().is_ok()) {
        e.to_string()
    } else {
        format!("{e}:{DEFAULT_PORT}")
    }
}

/// The host of `host:port` (brackets removed).
fn host_of(addr: &str) -> &str {
    let host = match addr.rsplit_once(':') {
        Some((h, p)) if p.parse::<u16>().is_ok() => h,
        _ => addr,
    };
    host.trim_start_matches('[').trim_end_matches(']')
}

// ------------------------------------------------------------------------------- calls

/// Where one call goes: address, TLS configuration, and the `node` metadata.
struct Target {
    addr: String,
    tls: Arc<ClientConfig>,
    node: Option<String>,
}

/// Why a call failed, before it becomes a [`TalosError`].
#[derive(Debug)]
enum CallError {
    /// TCP or TLS failed; `refused`: our side refused the server's certificate (not signed by
    /// the cluster CA, expired, not naming the node, a handshake signature that does not verify).
    Connect {
        message: String,
        refused: Option<rustls::Error>,
    },
    Status(tonic::Status),
    /// An answer's `metadata.error`.
    Metadata {
        code: String,
        message: String,
    },
    Timeout,
}

impl fmt::Display for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.detail())
    }
}

impl CallError {
    fn connect(target: &Target, err: &(dyn StdError + 'static)) -> CallError {
        CallError::Connect {
            message: format!("{}: {}", target.addr, error_chain(err)),
            refused: refused_by_us(err),
        }
    }

    /// Why our side refused the server's certificate, when it did.
    fn server_certificate_refused(&self) -> Option<rustls::Error> {
        match self {
            CallError::Connect { refused, .. } => refused.clone(),
            CallError::Status(s) => s.source().and_then(refused_by_us),
            _ => None,
        }
    }

    fn detail(&self) -> String {
        match self {
            CallError::Connect { message, .. } => message.clone(),
            CallError::Status(s) => match s.source() {
                Some(source) if s.message().is_empty() => format!("{:?}: {}", s.code(), error_chain(source)),
                _ => format!("{:?}: {}", s.code(), s.message()),
            },
            CallError::Metadata { code, message } => format!("{code}: {message}"),
            CallError::Timeout => format!("no answer within {}s", CALL_TIMEOUT.as_secs()),
        }
    }

    fn into_talos(self, node: &str) -> TalosError {
        let node = node.to_string();
        if let Some(refused) = self.server_certificate_refused() {
            return TalosError::Untrusted {
                node,
                message: format!("{} ({})", refused_certificate(&refused), self.detail()),
            };
        }
        match self {
            CallError::Status(s)
                if s.source().is_some() && matches!(s.code(), tonic::Code::Unavailable | tonic::Code::Unknown) =>
            {
                TalosError::Transport {
                    message: CallError::Status(s).detail(),
                    node,
                }
            }
            CallError::Status(s) => TalosError::Api {
                node,
                code: code_name(s.code()),
                message: s.message().to_string(),
            },
            CallError::Metadata { code, message } => TalosError::Api { node, code, message },
            e @ (CallError::Connect { .. } | CallError::Timeout) => TalosError::Transport {
                node,
                message: e.detail(),
            },
        }
    }
}

/// The error our verifier raised against the server's certificate, if that is why TLS failed.
fn refused_by_us(err: &(dyn StdError + 'static)) -> Option<rustls::Error> {
    let mut current = Some(err);
    while let Some(e) = current {
        let rustls_err = e.downcast_ref::<rustls::Error>().or_else(|| {
            e.downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        });
        if let Some(r) = rustls_err {
            return matches!(
                r,
                rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented
            )
            .then(|| r.clone());
        }
        current = e.source();
    }
    None
}

/// What our verifier held against a server's certificate, in words.
fn refused_certificate(e: &rustls::Error) -> String {
    let rustls::Error::InvalidCertificate(e) = e else {
        return format!("it presented no certificate the cluster CA signed ({e})");
    };
    match e {
        CertificateError::UnknownIssuer => "the cluster CA (the talosconfig's `ca`) did not sign its certificate".into(),
        // A handshake signature, or the one on the certificate, does not verify.
        CertificateError::BadSignature => "the cluster CA (the talosconfig's `ca`) did not sign its certificate, or it \
                                           does not hold the key of the certificate it shows (a signature does not verify)"
            .into(),
        other => format!("its certificate does not verify against the cluster CA ({other})"),
    }
}

/// Talos's maintenance service's answer to a call it does not serve.
fn is_maintenance_answer(s: &tonic::Status) -> bool {
    s.code() == tonic::Code::Unimplemented && s.message().contains(MAINTENANCE_MESSAGE)
}

/// TCP, then TLS, then HTTP/2: a channel for one call.
async fn connect(target: &Target) -> Result<Channel, CallError> {
    let host = host_of(&target.addr).to_string();
    let server_name = match host.parse::<IpAddr>() {
        Ok(ip) => ServerName::IpAddress(ip.into()),
        Err(_) => ServerName::try_from(host.clone()).map_err(|e| CallError::Connect {
            message: format!("{}: invalid host name: {e}", target.addr),
            refused: None,
        })?,
    };
    let handshake = async {
        let tcp = TcpStream::connect(&target.addr)
            .await
            .map_err(|e| CallError::connect(target, &e))?;
        let _ = tcp.set_nodelay(true);
        TlsConnector::from(target.tls.clone())
            .connect(server_name, tcp)
            .await
            .map_err(|e| CallError::connect(target, &e))
    };
    let tls = tokio::time::timeout(CONNECT_TIMEOUT, handshake)
        .await
        .map_err(|_| CallError::Connect {
            message: format!("{}: no connection within {}s", target.addr, CONNECT_TIMEOUT.as_secs()),
            refused: None,
        })??;
    let uri = format!("http://{}", target.addr);
    let endpoint = Endpoint::from_shared(uri).map_err(|e| CallError::connect(target, &e))?;
    endpoint
        .connect_with_connector(OneConnection(Arc::new(Mutex::new(Some(TokioIo::new(tls))))))
        .await
        .map_err(|e| CallError::connect(target, &e))
}

fn request<T>(target: &Target, message: T) -> Result<tonic::Request<T>, CallError> {
    let mut req = tonic::Request::new(message);
    if let Some(node) = &target.node {
        let value = node.parse().map_err(|_| CallError::Connect {
            message: format!("{node:?} cannot be sent as gRPC metadata"),
            refused: None,
        })?;
        req.metadata_mut().insert("node", value);
    }
    Ok(req)
}

async fn unary<Req, Resp>(
    channel: Channel,
    target: &Target,
    path: &'static str,
    message: Req,
) -> Result<Resp, CallError>
where
    Req: prost::Message + Send + Sync + 'static,
    Resp: prost::Message + Default + Send + Sync + 'static,
{
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.map_err(|e| CallError::connect(target, &e))?;
    let codec: ProstCodec<Req, Resp> = ProstCodec::default();
    let call = grpc.unary(request(target, message)?, PathAndQuery::from_static(path), codec);
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(Ok(resp)) => Ok(resp.into_inner()),
        Ok(Err(status)) => Err(CallError::Status(status)),
        Err(_) => Err(CallError::Timeout),
    }
}

/// A connector that hands tonic the one TLS stream made for this call.
#[derive(Clone)]
struct OneConnection(Arc<Mutex<Option<TokioIo<TlsStream<TcpStream>>>>>);

impl tonic::codegen::Service<Uri> for OneConnection {
    type Response = TokioIo<TlsStream<TcpStream>>;
    type Error = std::io::Error;
    type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        let io = self.0.lock().unwrap_or_else(|e| e.into_inner()).take();
        std::future::ready(io.ok_or_else(|| std::io::Error::other("the connection for this call is closed")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::talos_secrets::{TalosSecrets, talosconfig};

    #[test]
    fn endpoints_get_the_default_port() {
        assert_eq!(with_default_port("10.0.0.10"), "10.0.0.10:50000");
        assert_eq!(with_default_port("10.0.0.10:50001"), "10.0.0.10:50001");
        assert_eq!(with_default_port("talos.lan"), "talos.lan:50000");
        assert_eq!(with_default_port("fd00::1"), "[fd00::1]:50000");
        assert_eq!(with_default_port("[fd00::1]"), "[fd00::1]:50000");
        assert_eq!(with_default_port("[fd00::1]:7"), "[fd00::1]:7");
        assert_eq!(with_default_port("https://10.0.0.10:50000"), "10.0.0.10:50000");
        assert_eq!(host_of("[fd00::1]:7"), "fd00::1");
        assert_eq!(host_of("10.0.0.10:50000"), "10.0.0.10");
    }

    #[test]
    fn a_talosconfig_makes_a_client_and_debug_shows_no_key() {
        let bundle = TalosSecrets::generate();
        let text = talosconfig(&bundle, "lab", &["10.0.0.10".into()], &[]).unwrap();
        let client = TalosClient::from_talosconfig(text.as_bytes(), None).unwrap();
        assert_eq!(client.endpoint(), "10.0.0.10:50000");
        assert_eq!(client.context(), "lab");
        let overridden = TalosClient::from_talosconfig(text.as_bytes(), Some("127.0.0.1:4000")).unwrap();
        assert_eq!(overridden.endpoint(), "127.0.0.1:4000");
        let debug = format!("{client:?}");
        let v: yaml_serde::Value = yaml_serde::from_str(&text).unwrap();
        let key = v["contexts"]["lab"]["key"].as_str().unwrap();
        assert!(!debug.contains(key) && !debug.contains("PRIVATE"), "{debug}");

        let err = TalosClient::from_talosconfig(b"context: x\ncontexts: {}\n", None).unwrap_err();
        assert_eq!(err.to_string(), "the talosconfig has no context `x`");
        let broken = text.replace(key, "bm90IGEga2V5");
        let err = TalosClient::from_talosconfig(broken.as_bytes(), None).unwrap_err();
        assert!(err.to_string().contains("`key` is not base64-encoded PEM"), "{err}");
        let crt = v["contexts"]["lab"]["crt"].as_str().unwrap();
        let swapped = text.replace(key, crt);
        let err = TalosClient::from_talosconfig(swapped.as_bytes(), None).unwrap_err();
        assert!(err.to_string().contains("`key` is not a private key"), "{err}");
    }

    #[test]
    fn kubeconfig_archives_unpack() {
        let mut tar = tar::Builder::new(flate2::write::GzEncoder::new(
            Vec::new(),
            flate2::Compression::default(),
        ));
        let mut header = tar::Header::new_gnu();
        header.set_size(5);
        header.set_mode(0o600);
        tar.append_data(&mut header, "kubeconfig", &b"hello"[..]).unwrap();
        let gz = tar.into_inner().unwrap().finish().unwrap();
        assert_eq!(kubeconfig_from_archive(&gz).unwrap(), b"hello");
        assert!(kubeconfig_from_archive(b"not gzip").is_err());
    }

    #[test]
    fn code_names_are_grpcs() {
        assert_eq!(code_name(tonic::Code::InvalidArgument), "InvalidArgument");
        assert_eq!(code_name(tonic::Code::AlreadyExists), "AlreadyExists");
    }
}
