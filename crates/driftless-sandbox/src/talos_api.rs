//! The simulated Talos API: one gRPC server (`machine.MachineService`, the calls driftless
//! makes) over TLS on loopback, standing in for every Talos node of the sandbox. A request goes
//! to the node its `node` metadata names (a node address, as talosctl's `-n` sends it; none
//! means 127.0.0.1), the way apid proxies it.
//!
//! * A node with no config is in maintenance mode: it takes ApplyConfiguration from anyone
//!   (modes auto, reboot and try, as Talos's maintenance service) and answers Version,
//!   Bootstrap and Kubeconfig with Unimplemented "API is not implemented in maintenance mode".
//! * A configured node wants a client certificate that chains to its OS CA
//!   (`machine.ca.crt`) with the role `os:admin` in its organizations (any `os:` role for
//!   Version): Unauthenticated or PermissionDenied otherwise, as apid. Client certificates are
//!   optional at the TLS layer because the same listener serves nodes in maintenance mode.
//! * The server presents a self-signed certificate until a control-plane config carrying the OS
//!   CA's key is applied; from then on one signed by that CA, naming 127.0.0.1, localhost and
//!   every node address.
//! * Every config is checked against Talos's own JSON schema (v1.13.9 for configs installing
//!   v1.13, the main branch's otherwise; `data/`, copied from tests/fixtures/talos) and refused
//!   with InvalidArgument naming each problem; so is a config still holding `<secret:`
//!   placeholders.
//! * Apply: dry runs store nothing and answer with Talos's summary and a unified diff of the
//!   running config against the new one ("No changes." when equal); `auto` reboots for the
//!   first config or a changed install section and applies without a reboot otherwise;
//!   `staged` is kept apart from the running config; `try` is reverted after its timeout unless
//!   another apply comes first. A running config registers the node's kubelet as a
//!   [`SimNode`](cluster_state::SimNode) (name, address, kubelet version, role, labels, taints), whose kubelet runs
//!   once the control plane is bootstrapped; its `cluster.network.cni.name` is recorded as the
//!   cluster's CNI (`cluster_state::set_builtin_cni`).
//! * Upgrade on a configured node: the image must be a reference with a `vX.Y.Z` tag (the
//!   version the node then runs; its config is kept). The answer comes at once; then the node
//!   reboots for [`UPGRADE_REBOOT`]: every call to it answers Unavailable and its kubelet is
//!   down; after that Version reports the new tag. Each upgrade is recorded in
//!   `upgrades.jsonl` ([`upgrades`]) with the nodes that were rebooting when it was sent.
//! * Bootstrap on a configured control plane: the first call succeeds and starts the kubelets,
//!   later ones answer AlreadyExists "etcd data directory is not empty" (machined's words).
//!   Kubeconfig streams a gzipped tar holding `kubeconfig` (the simulated Kubernetes API's admin
//!   kubeconfig) once bootstrapped, FailedPrecondition before.
//!
//! [`serve_impostor`] is the attacker of the tests: a TLS gRPC server that claims to be a Talos
//! node (as the maintenance service would, or answering without client certificates) with a
//! certificate no cluster CA signed, logging every byte it is sent.
//!
//! State lives in `STATE/.sandbox/talos/`: `nodes/<address>/{config,staged,try-previous}.yaml`
//! and `meta.json`, `bootstrapped` (the control plane that was bootstrapped), `ca-node` (whose
//! CA signs the server certificate); every write is atomic.

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::fmt;
use std::future::{Future, Ready, ready};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};

use crate::talos_schema::kind_of;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsAcceptor;
use tonic::Status;
use tonic::codegen::http;
use tonic::server::{Grpc, NamedService, ServerStreamingService, UnaryService};
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic_prost::ProstCodec;

use crate::SandboxError;
use crate::cluster_state;
use crate::store::atomic_write;
use driftless::adapters::talos::proto::{self, ApplyMode};
use driftless::adapters::tls::HandshakeSignatures;
use driftless::cluster::talos_secrets::TalosCa;
use driftless::pki;
use driftless::ports::Taint;

/// Talos's maintenance-mode answer to everything but ApplyConfiguration.
pub const MAINTENANCE_MESSAGE: &str = "API is not implemented in maintenance mode";
/// The Talos version a node reports when its config names no installer tag.
const DEFAULT_TALOS_VERSION: &str = "v1.13.9";
/// How long a node is down after an Upgrade.
pub const UPGRADE_REBOOT: Duration = Duration::from_millis(1500);
/// Talos's `constants.ConfigTryTimeout`.
const DEFAULT_TRY_TIMEOUT: Duration = Duration::from_secs(60);

/// A running simulated Talos API. Dropping it leaves the server running until the runtime
/// ends; call [`TalosApiHandle::shutdown`] to stop it.
pub struct TalosApiHandle {
    /// `127.0.0.1:PORT`: the endpoint for talosconfig / `--talos-endpoint`.
    pub endpoint: String,
    pub addr: SocketAddr,
    stop: watch::Sender<bool>,
    join: tokio::task::JoinHandle<()>,
}

impl fmt::Debug for TalosApiHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TalosApiHandle")
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

impl TalosApiHandle {
    /// Stop accepting, let running calls finish, and wait for the server to end.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.join.await;
    }
}

/// Serve the simulated Talos API on `bind` (`127.0.0.1:0` for a free port) with its state
/// under `state_dir/.sandbox/talos/`. `seed` makes the reported build details deterministic.
pub async fn serve(state_dir: PathBuf, bind: SocketAddr, seed: u64) -> Result<TalosApiHandle, SandboxError> {
    let root = talos_dir(&state_dir);
    std::fs::create_dir_all(root.join("nodes")).map_err(|e| SandboxError::io(&root, e))?;
    let listener = TcpListener::bind(bind)
        .await
        .map_err(|source| SandboxError::Bind { addr: bind, source })?;
    let addr = listener
        .local_addr()
        .map_err(|source| SandboxError::Bind { addr: bind, source })?;
    let host = if addr.ip().is_unspecified() {
        "127.0.0.1".to_string()
    } else if addr.is_ipv6() {
        format!("[{}]", addr.ip())
    } else {
        addr.ip().to_string()
    };
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let sim = Arc::new(Sim {
        state_dir,
        seed,
        listen: addr,
        lock: Mutex::new(()),
        certs: Arc::new(CertResolver {
            current: RwLock::new(self_signed(&provider)?),
        }),
        provider: provider.clone(),
    });
    {
        let _guard = sim.locked();
        sim.refresh_cert();
    }
    let mut tls = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| SandboxError::Tls(e.to_string()))?
        .with_client_cert_verifier(Arc::new(OptionalClientCert(HandshakeSignatures::new(&provider))))
        .with_cert_resolver(sim.certs.clone());
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(tls));

    let (stop, stop_rx) = watch::channel(false);
    let (conn_tx, conn_rx) = mpsc::channel(64);
    let mut stop_accept = stop_rx.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop_requested(&mut stop_accept) => break,
                accepted = listener.accept() => {
                    let Ok((tcp, _)) = accepted else {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    };
                    let _ = tcp.set_nodelay(true);
                    let (acceptor, tx) = (acceptor.clone(), conn_tx.clone());
                    tokio::spawn(async move {
                        // Handshakes run apart, so a slow client holds up nobody.
                        if let Ok(Ok(stream)) = tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                            let _ = tx.send(Ok::<_, std::io::Error>(stream)).await;
                        }
                    });
                }
            }
        }
    });
    let incoming = futures_util::stream::unfold(conn_rx, |mut rx| async move { rx.recv().await.map(|c| (c, rx)) });
    let mut stop_serve = stop_rx;
    let service = MachineService { sim };
    let join = tokio::spawn(async move {
        let result = tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming_shutdown(incoming, async move { stop_requested(&mut stop_serve).await })
            .await;
        if let Err(e) = result {
            tracing::warn!("the sandbox Talos API stopped: {e}");
        }
    });
    Ok(TalosApiHandle {
        endpoint: format!("{host}:{}", addr.port()),
        addr,
        stop,
        join,
    })
}

/// Resolves when shutdown is asked for; never when the handle is dropped without it.
async fn stop_requested(rx: &mut watch::Receiver<bool>) {
    loop {
        if *rx.borrow_and_update() {
            return;
        }
        if rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

fn talos_dir(state_dir: &Path) -> PathBuf {
    state_dir.join(".sandbox").join("talos")
}

// ------------------------------------------------------------------------------- TLS

/// The server certificate: replaced when the OS CA becomes known.
#[derive(Debug)]
struct CertResolver {
    current: RwLock<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().unwrap_or_else(|e| e.into_inner()).clone())
    }
}

fn certified(
    provider: &CryptoProvider,
    cert_der: Vec<u8>,
    key_der: Vec<u8>,
) -> Result<Arc<CertifiedKey>, SandboxError> {
    let key = provider
        .key_provider
        .load_private_key(PrivateKeyDer::Pkcs8(key_der.into()))
        .map_err(|e| SandboxError::Tls(e.to_string()))?;
    Ok(Arc::new(CertifiedKey::new(vec![CertificateDer::from(cert_der)], key)))
}

fn self_signed(provider: &CryptoProvider) -> Result<Arc<CertifiedKey>, SandboxError> {
    let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string(), "localhost".to_string()])
        .map_err(|e| SandboxError::Tls(e.to_string()))?;
    certified(provider, cert.cert.der().to_vec(), cert.signing_key.serialize_der())
}

/// Asks for a client certificate but takes a connection without one (maintenance mode shares
/// the listener); a certificate is checked against the target node's CA per request. The
/// handshake signature is verified here (the product's [`HandshakeSignatures`]), which proves
/// the client holds the key of the certificate it shows.
#[derive(Debug)]
struct OptionalClientCert(HandshakeSignatures);

impl ClientCertVerifier for OptionalClientCert {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.schemes()
    }
}

// ------------------------------------------------------------------------------- gRPC plumbing

#[derive(Clone)]
struct MachineService {
    sim: Arc<Sim>,
}

impl NamedService for MachineService {
    const NAME: &'static str = proto::SERVICE;
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = Result<T, Infallible>> + Send>>;

impl tonic::codegen::Service<http::Request<tonic::body::Body>> for MachineService {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let sim = self.sim.clone();
        match req.uri().path() {
            proto::APPLY_CONFIGURATION => Box::pin(async move {
                let mut grpc = Grpc::new(ProstCodec::<
                    proto::ApplyConfigurationResponse,
                    proto::ApplyConfigurationRequest,
                >::default());
                Ok(grpc.unary(Unary(move |r| sim.apply_configuration(r)), req).await)
            }),
            proto::VERSION => Box::pin(async move {
                let mut grpc = Grpc::new(ProstCodec::<proto::VersionResponse, proto::Empty>::default());
                Ok(grpc.unary(Unary(move |r| sim.version(r)), req).await)
            }),
            proto::BOOTSTRAP => Box::pin(async move {
                let mut grpc = Grpc::new(ProstCodec::<proto::BootstrapResponse, proto::BootstrapRequest>::default());
                Ok(grpc.unary(Unary(move |r| sim.bootstrap(r)), req).await)
            }),
            proto::UPGRADE => Box::pin(async move {
                let mut grpc = Grpc::new(ProstCodec::<proto::UpgradeResponse, proto::UpgradeRequest>::default());
                Ok(grpc.unary(Unary(move |r| sim.upgrade(r)), req).await)
            }),
            proto::KUBECONFIG => Box::pin(async move {
                let mut grpc = Grpc::new(ProstCodec::<proto::Data, proto::Empty>::default());
                Ok(grpc.server_streaming(Streaming(move |r| sim.kubeconfig(r)), req).await)
            }),
            path => {
                let status = Status::unimplemented(format!("unknown method {path} (not simulated by the sandbox)"));
                Box::pin(async move { Ok(status.into_http()) })
            }
        }
    }
}

/// A unary handler from a plain function.
struct Unary<F>(F);

impl<Req, Resp, F> UnaryService<Req> for Unary<F>
where
    F: FnMut(tonic::Request<Req>) -> Result<Resp, Status>,
{
    type Response = Resp;
    type Future = Ready<Result<tonic::Response<Resp>, Status>>;

    fn call(&mut self, request: tonic::Request<Req>) -> Self::Future {
        ready((self.0)(request).map(tonic::Response::new))
    }
}

/// A server-streaming handler from a function returning every message at once.
struct Streaming<F>(F);

type MessageStream<T> = futures_util::stream::Iter<std::vec::IntoIter<Result<T, Status>>>;

impl<Req, Resp, F> ServerStreamingService<Req> for Streaming<F>
where
    F: FnMut(tonic::Request<Req>) -> Result<Vec<Resp>, Status>,
{
    type Response = Resp;
    type ResponseStream = MessageStream<Resp>;
    type Future = Ready<Result<tonic::Response<Self::ResponseStream>, Status>>;

    fn call(&mut self, request: tonic::Request<Req>) -> Self::Future {
        ready((self.0)(request).map(|messages| {
            tonic::Response::new(futures_util::stream::iter(
                messages.into_iter().map(Ok).collect::<Vec<_>>(),
            ))
        }))
    }
}

// ------------------------------------------------------------------------------- the nodes

struct Sim {
    state_dir: PathBuf,
    seed: u64,
    listen: SocketAddr,
    /// One request at a time changes the files.
    lock: Mutex<()>,
    certs: Arc<CertResolver>,
    provider: Arc<CryptoProvider>,
}

/// Per-node bookkeeping next to the configs.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct NodeMeta {
    address: String,
    /// Unix seconds after which a `try` config is reverted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    try_deadline: Option<u64>,
    /// The SimNode name the running config registered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    registered_as: Option<String>,
    /// The Talos version installed: the first config's installer tag, then each upgrade's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    talos_version: Option<String>,
    /// Unix milliseconds until which the node reboots after an upgrade.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    rebooting_until_ms: Option<u64>,
}

/// One Upgrade the sandbox took, as `upgrades.jsonl` keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpgradeRecord {
    /// The node's address.
    pub node: String,
    pub image: String,
    pub from: String,
    pub to: String,
    /// Unix milliseconds: when the request came, when the node was back.
    pub at_ms: u64,
    pub back_ms: u64,
    /// Nodes still rebooting when this upgrade was sent.
    pub overlapping: Vec<String>,
}

/// Every upgrade the sandbox in `state_dir` took, in order.
pub fn upgrades(state_dir: &Path) -> Vec<UpgradeRecord> {
    std::fs::read_to_string(talos_dir(state_dir).join("upgrades.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// `REPOSITORY:vX.Y.Z`, as an installer reference the sandbox can tell the version of.
fn installer_version(image: &str) -> Result<String, String> {
    if image.contains('@') {
        return Err("the sandbox reads the version from the tag; a reference by digest has none".into());
    }
    let name_end = image.rfind('/').map_or(0, |i| i + 1);
    let (repository, tag) = match image[name_end..].rfind(':') {
        Some(colon) => (&image[..name_end + colon], &image[name_end + colon + 1..]),
        None => return Err("no tag".into()),
    };
    let repository_ok = repository.contains('/')
        && !repository.starts_with(['/', '.', '-'])
        && repository
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "./:_-".contains(c));
    if !repository_ok {
        return Err(format!("`{repository}` is not an image repository"));
    }
    let core = tag
        .strip_prefix('v')
        .ok_or_else(|| format!("tag `{tag}` is not vX.Y.Z"))?;
    let core = core.split(['-', '+']).next().unwrap_or_default();
    let parts: Vec<&str> = core.split('.').collect();
    if parts.len() != 3
        || parts
            .iter()
            .any(|p| p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(format!("tag `{tag}` is not vX.Y.Z"));
    }
    Ok(tag.to_string())
}

/// Who asked: the target node and the client certificate chain, if any.
struct Caller {
    node: String,
    certs: Option<Arc<Vec<CertificateDer<'static>>>>,
}

fn caller<T>(req: &tonic::Request<T>) -> Result<Caller, Status> {
    let node = req
        .metadata()
        .get("node")
        .or_else(|| req.metadata().get("nodes"))
        .map(|v| v.to_str().map(|s| s.split(',').next().unwrap_or("").trim().to_string()))
        .transpose()
        .map_err(|_| Status::invalid_argument("the node metadata is not text"))?
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "127.0.0.1".to_string());
    if !node
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | ':' | '-' | '[' | ']'))
    {
        return Err(Status::invalid_argument(format!("invalid node address {node:?}")));
    }
    let node = node.trim_start_matches('[').trim_end_matches(']').to_string();
    let certs = req
        .extensions()
        .get::<TlsConnectInfo<TcpConnectInfo>>()
        .and_then(|info| info.peer_certs());
    Ok(Caller { node, certs })
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

fn io_status(what: &Path, e: std::io::Error) -> Status {
    Status::internal(format!("sandbox state {}: {e}", what.display()))
}

impl Sim {
    fn locked(&self) -> std::sync::MutexGuard<'_, ()> {
        self.lock.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn node_dir(&self, node: &str) -> PathBuf {
        talos_dir(&self.state_dir).join("nodes").join(node.replace(':', "_"))
    }

    fn read_text(path: &Path) -> Option<String> {
        std::fs::read_to_string(path).ok()
    }

    fn write(path: &Path, bytes: &[u8]) -> Result<(), Status> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| io_status(dir, e))?;
        }
        atomic_write(path, bytes).map_err(|e| io_status(path, e))
    }

    fn remove(path: &Path) -> Result<(), Status> {
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_status(path, e)),
            _ => Ok(()),
        }
    }

    fn meta(&self, node: &str) -> NodeMeta {
        Self::read_text(&self.node_dir(node).join("meta.json"))
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_else(|| NodeMeta {
                address: node.to_string(),
                ..NodeMeta::default()
            })
    }

    fn write_meta(&self, node: &str, meta: &NodeMeta) -> Result<(), Status> {
        let json = serde_json::to_vec_pretty(meta).map_err(|e| Status::internal(e.to_string()))?;
        Self::write(&self.node_dir(node).join("meta.json"), &json)
    }

    /// The running config, after reverting an expired `try`.
    fn running(&self, node: &str) -> Result<Option<Config>, Status> {
        let dir = self.node_dir(node);
        let mut meta = self.meta(node);
        if let Some(deadline) = meta.try_deadline
            && now_unix() >= deadline
        {
            let previous = dir.join("try-previous.yaml");
            let current = Self::read_text(&dir.join("config.yaml"));
            if let Some(text) = Self::read_text(&previous) {
                Self::write(&dir.join("config.yaml"), text.as_bytes())?;
                Self::remove(&previous)?;
                meta.try_deadline = None;
                self.write_meta(node, &meta)?;
                let old = current.as_deref().and_then(|t| Config::parse(t).ok());
                let restored = Config::parse(&text).map_err(Status::internal)?;
                self.register(node, old.as_ref(), &restored)?;
            }
        }
        match Self::read_text(&dir.join("config.yaml")) {
            Some(text) => Config::parse(&text).map(Some).map_err(Status::internal),
            None => Ok(None),
        }
    }

    /// A node rebooting after an upgrade answers nothing.
    fn up(&self, node: &str) -> Result<(), Status> {
        match self.meta(node).rebooting_until_ms {
            Some(until) if cluster_state::now_ms() < until => Err(Status::unavailable(format!(
                "{node} is rebooting (upgrade): connection refused"
            ))),
            _ => Ok(()),
        }
    }

    /// Every configured node's address.
    fn configured_nodes(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(talos_dir(&self.state_dir).join("nodes")) else {
            return Vec::new();
        };
        let mut out: Vec<String> = entries
            .filter_map(|e| e.ok())
            .filter(|e| e.path().join("config.yaml").exists())
            .filter_map(|e| {
                let meta: NodeMeta = serde_json::from_str(&Self::read_text(&e.path().join("meta.json"))?).ok()?;
                Some(meta.address)
            })
            .collect();
        out.sort();
        out
    }

    fn bootstrapped(&self) -> bool {
        talos_dir(&self.state_dir).join("bootstrapped").exists()
    }

    /// A configured node asks for a client certificate signed by its OS CA, with a role.
    fn authorize(&self, caller: &Caller, config: &Config, admin: bool) -> Result<(), Status> {
        let Some(chain) = caller.certs.as_ref().filter(|c| !c.is_empty()) else {
            return Err(Status::unauthenticated(
                "client certificate required (this node is configured: use the talosconfig's credentials)",
            ));
        };
        let mut roots = RootCertStore::empty();
        for cert in config.ca_certs() {
            let _ = roots.add(cert);
        }
        if roots.is_empty() {
            return Err(Status::unauthenticated(
                "the node's config has no OS CA (machine.ca.crt)",
            ));
        }
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
            .build()
            .map_err(|e| Status::internal(e.to_string()))?;
        verifier
            .verify_client_cert(&chain[0], &chain[1..], UnixTime::now())
            .map_err(|e| {
                Status::unauthenticated(format!(
                    "the client certificate is not accepted by the node's OS CA: {e}"
                ))
            })?;
        let roles = pki::organizations(&chain[0]);
        let allowed = if admin {
            roles.iter().any(|r| r == "os:admin")
        } else {
            roles.iter().any(|r| r.starts_with("os:"))
        };
        if allowed {
            Ok(())
        } else {
            Err(Status::permission_denied(format!(
                "not authorized: the client certificate's roles {roles:?} do not include {}",
                if admin { "os:admin" } else { "an os: role" }
            )))
        }
    }

    fn metadata(&self, node: &str, config: Option<&Config>) -> Option<proto::Metadata> {
        Some(proto::Metadata {
            hostname: config.and_then(Config::hostname).unwrap_or_else(|| node.to_string()),
            error: String::new(),
            status: None,
        })
    }

    // ---- the calls

    fn version(&self, req: tonic::Request<proto::Empty>) -> Result<proto::VersionResponse, Status> {
        let caller = caller(&req)?;
        let _guard = self.locked();
        self.up(&caller.node)?;
        let Some(config) = self.running(&caller.node)? else {
            return Err(Status::unimplemented(MAINTENANCE_MESSAGE));
        };
        self.authorize(&caller, &config, false)?;
        let sha: String = format!("{:016x}", crate::store::splitmix64(self.seed ^ 0x7a105))[..8].to_string();
        Ok(proto::VersionResponse {
            messages: vec![proto::Version {
                metadata: self.metadata(&caller.node, Some(&config)),
                version: Some(proto::VersionInfo {
                    tag: self
                        .meta(&caller.node)
                        .talos_version
                        .unwrap_or_else(|| config.talos_version()),
                    sha,
                    built: String::new(),
                    go_version: "go1.25 (driftless sandbox)".into(),
                    os: "linux".into(),
                    arch: "amd64".into(),
                }),
                platform: Some(proto::PlatformInfo {
                    name: "metal".into(),
                    mode: "metal".into(),
                }),
            }],
        })
    }

    fn apply_configuration(
        &self,
        req: tonic::Request<proto::ApplyConfigurationRequest>,
    ) -> Result<proto::ApplyConfigurationResponse, Status> {
        let caller = caller(&req)?;
        let req = req.into_inner();
        let mode = ApplyMode::try_from(req.mode)
            .map_err(|_| Status::invalid_argument(format!("unknown mode {}", req.mode)))?;
        let _guard = self.locked();
        self.up(&caller.node)?;
        let running = self.running(&caller.node)?;
        if let Some(config) = &running {
            self.authorize(&caller, config, true)?;
        } else if !matches!(mode, ApplyMode::Auto | ApplyMode::Reboot | ApplyMode::Try) {
            return Err(Status::unknown(format!(
                "apply configuration --mode='{}' is not supported in maintenance mode",
                mode.flag()
            )));
        }
        let text =
            String::from_utf8(req.data).map_err(|_| Status::invalid_argument("failed to parse config: not UTF-8"))?;
        if text.contains("<secret:") {
            return Err(Status::invalid_argument("config contains unfilled placeholders"));
        }
        let new = Config::parse(&text).map_err(|e| Status::invalid_argument(format!("failed to parse config: {e}")))?;
        if new.v1alpha1().is_none() {
            return Err(Status::invalid_argument(
                "the applied machine configuration doesn't contain v1alpha1 config, did you mean to patch the machine config instead?",
            ));
        }
        new.validate()?;

        let Some(old) = running else {
            // Maintenance mode: the config is installed and the machine reboots into it.
            let mut answer = proto::ApplyConfiguration {
                metadata: self.metadata(&caller.node, Some(&new)),
                mode: ApplyMode::Reboot as i32,
                ..Default::default()
            };
            if req.dry_run {
                answer.mode_details =
                    "Dry run summary:\nNode is running in maintenance mode and does not have a config yet.".into();
            } else {
                self.store_running(&caller.node, None, &new, None)?;
            }
            return Ok(proto::ApplyConfigurationResponse { messages: vec![answer] });
        };

        let install_changed = old.install() != new.install();
        let (resolved, mut details) = match mode {
            ApplyMode::Try | ApplyMode::NoReboot => {
                if install_changed {
                    return Err(Status::invalid_argument(
                        "this config change can't be applied in immediate mode: the installation settings changed (use --mode=reboot or auto)",
                    ));
                }
                (mode, "Applied configuration without a reboot".to_string())
            }
            ApplyMode::Staged => (
                mode,
                "Staged configuration to be applied after the next reboot".to_string(),
            ),
            ApplyMode::Reboot => (mode, "Applied configuration with a reboot".to_string()),
            ApplyMode::Auto if install_changed => {
                (ApplyMode::Reboot, "Applied configuration with a reboot".to_string())
            }
            ApplyMode::Auto => (
                ApplyMode::NoReboot,
                "Applied configuration without a reboot".to_string(),
            ),
        };
        if req.dry_run {
            let diff = unified_diff(&old.text, &new.text);
            let diff = if diff.is_empty() {
                "No changes.".to_string()
            } else {
                diff
            };
            // machined: "Dry run summary:\n%s (skipped in dry-run).\n%s" with "Config diff:\n\n" + diff.
            details = format!("Dry run summary:\n{details} (skipped in dry-run).\nConfig diff:\n\n{diff}");
        } else {
            let dir = self.node_dir(&caller.node);
            match resolved {
                ApplyMode::Staged => Self::write(&dir.join("staged.yaml"), new.text.as_bytes())?,
                ApplyMode::Try => {
                    let timeout = req
                        .try_mode_timeout
                        .map(|d| Duration::from_secs(d.seconds.max(0) as u64))
                        .filter(|d| !d.is_zero())
                        .unwrap_or(DEFAULT_TRY_TIMEOUT);
                    details.push_str(&format!(
                        "\nThe config is applied in 'try' mode and will be automatically reverted back in {}",
                        go_duration(timeout)
                    ));
                    // Revert to the config before the first of a series of tries.
                    let previous = dir.join("try-previous.yaml");
                    if !previous.exists() {
                        Self::write(&previous, old.text.as_bytes())?;
                    }
                    self.store_running(&caller.node, Some(&old), &new, Some(now_unix() + timeout.as_secs()))?;
                }
                _ => {
                    Self::remove(&dir.join("try-previous.yaml"))?;
                    Self::remove(&dir.join("staged.yaml"))?;
                    self.store_running(&caller.node, Some(&old), &new, None)?;
                }
            }
        }
        Ok(proto::ApplyConfigurationResponse {
            messages: vec![proto::ApplyConfiguration {
                metadata: self.metadata(&caller.node, Some(&new)),
                warnings: Vec::new(),
                mode: resolved as i32,
                mode_details: details,
            }],
        })
    }

    /// Makes `new` the running config: file, SimNode, server certificate.
    fn store_running(
        &self,
        node: &str,
        old: Option<&Config>,
        new: &Config,
        try_deadline: Option<u64>,
    ) -> Result<(), Status> {
        let dir = self.node_dir(node);
        Self::write(&dir.join("config.yaml"), new.text.as_bytes())?;
        let mut meta = self.meta(node);
        meta.address = node.to_string();
        meta.try_deadline = try_deadline;
        if old.is_none() {
            // Installed from maintenance mode: the installer the config names. Later configs
            // do not change what is installed; an upgrade does.
            meta.talos_version = Some(new.talos_version());
        }
        self.write_meta(node, &meta)?;
        if new.is_control_plane() && new.ca_key_pem().is_some() {
            Self::write(&talos_dir(&self.state_dir).join("ca-node"), node.as_bytes())?;
        }
        self.register(node, old, new)?;
        self.refresh_cert();
        Ok(())
    }

    /// Writes the node's kubelet registration from its running config, keeping what the
    /// Kubernetes API changed (labels and taints the config never set, annotations, vmid).
    fn register(&self, node: &str, old: Option<&Config>, new: &Config) -> Result<(), Status> {
        let mut meta = self.meta(node);
        let name = new.hostname().unwrap_or_else(|| node.to_string());
        if let Some(previous) = meta.registered_as.as_ref().filter(|p| **p != name) {
            Self::remove(
                &cluster_state::dir(&self.state_dir)
                    .join("nodes")
                    .join(format!("{previous}.json")),
            )?;
        }
        let mut sim = cluster_state::read_node(&self.state_dir, &name).unwrap_or_default();
        let (old_labels, old_taints) = old.map(|o| (o.labels(), o.taints())).unwrap_or_default();
        for key in old_labels.keys() {
            sim.labels.remove(key);
        }
        sim.labels.extend(new.labels());
        let old_keys: BTreeSet<String> = old_taints.iter().map(|t| t.key.clone()).collect();
        sim.taints.retain(|t| !old_keys.contains(&t.key));
        let new_taints = new.taints();
        let new_keys: BTreeSet<&str> = new_taints.iter().map(|t| t.key.as_str()).collect();
        sim.taints.retain(|t| !new_keys.contains(t.key.as_str()));
        sim.taints.extend(new_taints);
        sim.taints.sort();
        sim.name = name.clone();
        sim.internal_ip = node.to_string();
        sim.kubelet_version = new.kubelet_version();
        sim.role = if new.is_control_plane() {
            "controlplane"
        } else {
            "worker"
        }
        .to_string();
        sim.kubelet_running = self.bootstrapped();
        cluster_state::write_node(&self.state_dir, &sim).map_err(|e| io_status(&self.state_dir, e))?;
        // `cluster.network.cni.name` (flannel when unset) is the cluster's own CNI.
        let cni = new
            .str_at("/cluster/network/cni/name")
            .and_then(|n| cluster_state::BuiltinCni::parse(&n))
            .unwrap_or(cluster_state::BuiltinCni::Flannel);
        cluster_state::set_builtin_cni(&self.state_dir, cni).map_err(|e| io_status(&self.state_dir, e))?;
        meta.address = node.to_string();
        meta.registered_as = Some(name);
        self.write_meta(node, &meta)
    }

    /// The server certificate: signed by the OS CA of the control plane in `ca-node`, naming
    /// loopback and every node; self-signed while no CA is known.
    fn refresh_cert(&self) {
        let Some(ca_node) = Self::read_text(&talos_dir(&self.state_dir).join("ca-node")) else {
            return;
        };
        let Some(config) =
            Self::read_text(&self.node_dir(ca_node.trim()).join("config.yaml")).and_then(|t| Config::parse(&t).ok())
        else {
            return;
        };
        let (Some(crt), Some(key)) = (config.ca_cert_pem(), config.ca_key_pem()) else {
            return;
        };
        let mut names: BTreeSet<String> = ["127.0.0.1".to_string(), "localhost".to_string()].into();
        if !self.listen.ip().is_unspecified() {
            names.insert(self.listen.ip().to_string());
        }
        names.extend(self.configured_nodes());
        let names: Vec<String> = names.into_iter().collect();
        let issued = TalosCa::from_pem(&crt, &key)
            .and_then(|ca| ca.issue_server_cert(&names))
            .map_err(|e| SandboxError::Tls(e.to_string()))
            .and_then(|(cert, key)| certified(&self.provider, cert, key));
        match issued {
            Ok(key) => *self.certs.current.write().unwrap_or_else(|e| e.into_inner()) = key,
            Err(e) => tracing::warn!("the sandbox Talos API keeps its certificate: {e}"),
        }
    }

    fn upgrade(&self, req: tonic::Request<proto::UpgradeRequest>) -> Result<proto::UpgradeResponse, Status> {
        let caller = caller(&req)?;
        let req = req.into_inner();
        let _guard = self.locked();
        self.up(&caller.node)?;
        let Some(config) = self.running(&caller.node)? else {
            return Err(Status::unimplemented(MAINTENANCE_MESSAGE));
        };
        self.authorize(&caller, &config, true)?;
        let to = installer_version(&req.image)
            .map_err(|e| Status::invalid_argument(format!("error validating installer image {:?}: {e}", req.image)))?;
        let now = cluster_state::now_ms();
        let back = now + u64::try_from(UPGRADE_REBOOT.as_millis()).unwrap_or(u64::MAX);
        let overlapping: Vec<String> = self
            .configured_nodes()
            .into_iter()
            .filter(|n| *n != caller.node && self.meta(n).rebooting_until_ms.is_some_and(|until| now < until))
            .collect();
        let mut meta = self.meta(&caller.node);
        let from = meta.talos_version.clone().unwrap_or_else(|| config.talos_version());
        meta.talos_version = Some(to.clone());
        meta.rebooting_until_ms = Some(back);
        self.write_meta(&caller.node, &meta)?;
        // The kubelet goes down with the machine; the config is kept.
        if let Some(mut sim) = meta
            .registered_as
            .as_ref()
            .and_then(|n| cluster_state::read_node(&self.state_dir, n))
        {
            sim.rebooting_until_ms = Some(back);
            cluster_state::write_node(&self.state_dir, &sim).map_err(|e| io_status(&self.state_dir, e))?;
        }
        let record = UpgradeRecord {
            node: caller.node.clone(),
            image: req.image.clone(),
            from,
            to,
            at_ms: now,
            back_ms: back,
            overlapping,
        };
        let log = talos_dir(&self.state_dir).join("upgrades.jsonl");
        let mut text = Self::read_text(&log).unwrap_or_default();
        text.push_str(&serde_json::to_string(&record).map_err(|e| Status::internal(e.to_string()))?);
        text.push('\n');
        Self::write(&log, text.as_bytes())?;
        Ok(proto::UpgradeResponse {
            messages: vec![proto::Upgrade {
                metadata: self.metadata(&caller.node, Some(&config)),
                ack: "Upgrade request received".into(),
                actor_id: format!("{:016x}", crate::store::splitmix64(self.seed ^ now)),
            }],
        })
    }

    fn bootstrap(&self, req: tonic::Request<proto::BootstrapRequest>) -> Result<proto::BootstrapResponse, Status> {
        let caller = caller(&req)?;
        let _guard = self.locked();
        self.up(&caller.node)?;
        let Some(config) = self.running(&caller.node)? else {
            return Err(Status::unimplemented(MAINTENANCE_MESSAGE));
        };
        self.authorize(&caller, &config, true)?;
        if !config.is_control_plane() {
            return Err(Status::failed_precondition(
                "bootstrap can only be performed on a control plane node",
            ));
        }
        let flag = talos_dir(&self.state_dir).join("bootstrapped");
        if flag.exists() {
            return Err(Status::already_exists("etcd data directory is not empty"));
        }
        Self::write(&flag, format!("{}\n", caller.node).as_bytes())?;
        // etcd and the control plane come up; every configured node's kubelet registers.
        for node in self.configured_nodes() {
            let name = self.meta(&node).registered_as;
            if let Some(mut sim) = name.and_then(|n| cluster_state::read_node(&self.state_dir, &n)) {
                sim.kubelet_running = true;
                cluster_state::write_node(&self.state_dir, &sim).map_err(|e| io_status(&self.state_dir, e))?;
            }
        }
        Ok(proto::BootstrapResponse {
            messages: vec![proto::Bootstrap {
                metadata: self.metadata(&caller.node, Some(&config)),
            }],
        })
    }

    fn kubeconfig(&self, req: tonic::Request<proto::Empty>) -> Result<Vec<proto::Data>, Status> {
        let caller = caller(&req)?;
        let _guard = self.locked();
        self.up(&caller.node)?;
        let Some(config) = self.running(&caller.node)? else {
            return Err(Status::unimplemented(MAINTENANCE_MESSAGE));
        };
        self.authorize(&caller, &config, true)?;
        if !config.is_control_plane() {
            return Err(Status::failed_precondition(
                "kubeconfig is only available on control plane nodes",
            ));
        }
        if !self.bootstrapped() {
            return Err(Status::failed_precondition(
                "the cluster is not bootstrapped yet: no Kubernetes API to make a kubeconfig for",
            ));
        }
        let path = cluster_state::admin_kubeconfig_path(&self.state_dir);
        let kubeconfig = std::fs::read(&path)
            .map_err(|e| Status::failed_precondition(format!("no admin kubeconfig yet ({}: {e})", path.display())))?;
        // As machined: a .tar.gz holding `kubeconfig` (mode 0600), in one message.
        let mut tar = tar::Builder::new(flate2::write::GzEncoder::new(
            Vec::new(),
            flate2::Compression::default(),
        ));
        let mut header = tar::Header::new_gnu();
        header.set_size(kubeconfig.len() as u64);
        header.set_mode(0o600);
        header.set_mtime(now_unix());
        header.set_entry_type(tar::EntryType::Regular);
        let archive = tar
            .append_data(&mut header, "kubeconfig", kubeconfig.as_slice())
            .and_then(|_| tar.into_inner())
            .and_then(|gz| gz.finish())
            .map_err(|e| Status::internal(format!("cannot pack the kubeconfig: {e}")))?;
        Ok(vec![proto::Data {
            metadata: self.metadata(&caller.node, Some(&config)),
            bytes: archive,
        }])
    }
}

// ------------------------------------------------------------------------------- an impostor

/// How an [`Impostor`] answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImpostorKind {
    /// Word for word as Talos's maintenance service: ApplyConfiguration is taken, everything
    /// else answers Unimplemented "API is not implemented in maintenance mode". Nothing on the
    /// wire tells it from a node booted without a config.
    Maintenance,
    /// As a Talos node that asks for no client certificate: Version answers.
    Answering,
}

/// What an [`Impostor`] was sent.
#[derive(Debug, Clone, Default)]
pub struct ImpostorLog {
    /// Every gRPC call: its path and its `node` metadata.
    pub calls: Vec<(String, Option<String>)>,
    /// The machine configs ApplyConfiguration brought.
    pub configs: Vec<Vec<u8>>,
    /// Every byte clients sent it inside TLS (HTTP/2 frames, gRPC messages as they travel).
    pub received: Vec<u8>,
}

/// A gRPC server over TLS on loopback that claims to be a Talos node, for attacker tests:
/// whoever takes a node's address. It asks for no client certificate, logs everything it is
/// sent, and presents a self-signed certificate (no cluster CA signed it) unless given one.
pub struct Impostor {
    /// `127.0.0.1:PORT`.
    pub endpoint: String,
    log: Arc<Mutex<ImpostorLog>>,
    stop: watch::Sender<bool>,
    join: tokio::task::JoinHandle<()>,
}

impl fmt::Debug for Impostor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Impostor")
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

impl Impostor {
    /// What it was sent so far.
    pub fn log(&self) -> ImpostorLog {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.join.await;
    }
}

/// Serve an [`Impostor`] on a free loopback port. `presented`: a certificate to present and the
/// PKCS#8 key to sign handshakes with (a stolen certificate and a key of the impostor's);
/// a new self-signed certificate otherwise.
pub async fn serve_impostor(
    kind: ImpostorKind,
    presented: Option<(Vec<u8>, Vec<u8>)>,
) -> Result<Impostor, SandboxError> {
    let bind = SocketAddr::from(([127, 0, 0, 1], 0));
    let listener = TcpListener::bind(bind)
        .await
        .map_err(|source| SandboxError::Bind { addr: bind, source })?;
    let addr = listener
        .local_addr()
        .map_err(|source| SandboxError::Bind { addr: bind, source })?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let presented = match presented {
        Some((cert, key)) => certified(&provider, cert, key)?,
        None => self_signed(&provider)?,
    };
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| SandboxError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(CertResolver {
            current: RwLock::new(presented),
        }));
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(tls));
    let log = Arc::new(Mutex::new(ImpostorLog::default()));

    let (stop, stop_rx) = watch::channel(false);
    let (conn_tx, conn_rx) = mpsc::channel(16);
    let mut stop_accept = stop_rx.clone();
    let accept_log = log.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop_requested(&mut stop_accept) => break,
                accepted = listener.accept() => {
                    let Ok((tcp, _)) = accepted else { continue };
                    let (acceptor, tx, log) = (acceptor.clone(), conn_tx.clone(), accept_log.clone());
                    tokio::spawn(async move {
                        if let Ok(Ok(stream)) = tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                            let _ = tx.send(Ok::<_, std::io::Error>(Recorded { inner: stream, log })).await;
                        }
                    });
                }
            }
        }
    });
    let incoming = futures_util::stream::unfold(conn_rx, |mut rx| async move { rx.recv().await.map(|c| (c, rx)) });
    let service = ImpostorService { kind, log: log.clone() };
    let mut stop_serve = stop_rx;
    let join = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming_shutdown(incoming, async move { stop_requested(&mut stop_serve).await })
            .await;
    });
    Ok(Impostor {
        endpoint: format!("127.0.0.1:{}", addr.port()),
        log,
        stop,
        join,
    })
}

/// A TLS stream that copies what the client sends into the impostor's log.
struct Recorded {
    inner: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    log: Arc<Mutex<ImpostorLog>>,
}

impl tonic::transport::server::Connected for Recorded {
    type ConnectInfo = ();

    fn connect_info(&self) -> Self::ConnectInfo {}
}

impl tokio::io::AsyncRead for Recorded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &polled {
            let new = buf.filled()[before..].to_vec();
            self.log.lock().unwrap_or_else(|e| e.into_inner()).received.extend(new);
        }
        polled
    }
}

impl tokio::io::AsyncWrite for Recorded {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[derive(Clone)]
struct ImpostorService {
    kind: ImpostorKind,
    log: Arc<Mutex<ImpostorLog>>,
}

impl NamedService for ImpostorService {
    const NAME: &'static str = proto::SERVICE;
}

impl tonic::codegen::Service<http::Request<tonic::body::Body>> for ImpostorService {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let path = req.uri().path().to_string();
        let node = req
            .headers()
            .get("node")
            .and_then(|v| v.to_str().ok())
            .map(String::from);
        self.log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .calls
            .push((path.clone(), node));
        let (kind, log) = (self.kind, self.log.clone());
        match path.as_str() {
            proto::APPLY_CONFIGURATION => Box::pin(async move {
                let mut grpc = Grpc::new(ProstCodec::<
                    proto::ApplyConfigurationResponse,
                    proto::ApplyConfigurationRequest,
                >::default());
                let take = move |r: tonic::Request<proto::ApplyConfigurationRequest>| {
                    let request = r.into_inner();
                    log.lock().unwrap_or_else(|e| e.into_inner()).configs.push(request.data);
                    Ok(proto::ApplyConfigurationResponse {
                        messages: vec![proto::ApplyConfiguration {
                            mode: ApplyMode::Reboot as i32,
                            ..Default::default()
                        }],
                    })
                };
                Ok(grpc.unary(Unary(take), req).await)
            }),
            proto::VERSION if kind == ImpostorKind::Answering => Box::pin(async move {
                let mut grpc = Grpc::new(ProstCodec::<proto::VersionResponse, proto::Empty>::default());
                let answer = |_: tonic::Request<proto::Empty>| {
                    Ok(proto::VersionResponse {
                        messages: vec![proto::Version {
                            metadata: None,
                            version: Some(proto::VersionInfo {
                                tag: DEFAULT_TALOS_VERSION.into(),
                                ..Default::default()
                            }),
                            platform: None,
                        }],
                    })
                };
                Ok(grpc.unary(Unary(answer), req).await)
            }),
            _ => {
                let status = Status::unimplemented(MAINTENANCE_MESSAGE);
                Box::pin(async move { Ok(status.into_http()) })
            }
        }
    }
}

// ------------------------------------------------------------------------------- configs

/// A machine config as received: its text and its documents as JSON.
struct Config {
    text: String,
    docs: Vec<Value>,
}

/// The tag of an image reference (`...:v1.13.9` -> `v1.13.9`).
fn image_tag(image: &str) -> Option<String> {
    let (_, tag) = image.rsplit_once(':')?;
    (!tag.contains('/')).then(|| tag.to_string())
}

impl Config {
    fn parse(text: &str) -> Result<Config, String> {
        let mut docs = Vec::new();
        for (i, de) in yaml_serde::Deserializer::from_str(text).enumerate() {
            let yaml = yaml_serde::Value::deserialize(de).map_err(|e| format!("document {}: {e}", i + 1))?;
            if yaml.is_null() {
                continue;
            }
            let json = serde_json::to_value(yaml).map_err(|e| format!("document {}: {e}", i + 1))?;
            docs.push(json);
        }
        Ok(Config {
            text: text.to_string(),
            docs,
        })
    }

    fn v1alpha1(&self) -> Option<&Value> {
        self.docs.iter().find(|d| kind_of(d) == "v1alpha1")
    }

    fn doc(&self, kind: &str) -> Option<&Value> {
        self.docs.iter().find(|d| kind_of(d) == kind)
    }

    fn str_at(&self, pointer: &str) -> Option<String> {
        self.v1alpha1()?.pointer(pointer)?.as_str().map(String::from)
    }

    fn is_control_plane(&self) -> bool {
        matches!(self.str_at("/machine/type").as_deref(), Some("controlplane" | "init"))
    }

    fn hostname(&self) -> Option<String> {
        self.doc("HostnameConfig")
            .and_then(|d| d.get("hostname"))
            .and_then(Value::as_str)
            .map(String::from)
            .or_else(|| self.str_at("/machine/network/hostname"))
            .filter(|h| !h.is_empty())
    }

    fn installer_image(&self) -> Option<String> {
        self.str_at("/machine/install/image").or_else(|| {
            self.doc("UnattendedInstall")?
                .pointer("/installer/image")?
                .as_str()
                .map(String::from)
        })
    }

    /// What decides whether a change needs a reboot here: the install settings.
    /// The installer image is not among them: Talos reads it only at an upgrade.
    fn install(&self) -> (Option<Value>, Option<Value>) {
        let mut machine = self.v1alpha1().and_then(|d| d.pointer("/machine/install")).cloned();
        if let Some(m) = machine.as_mut().and_then(Value::as_object_mut) {
            m.remove("image");
        }
        let mut unattended = self.doc("UnattendedInstall").cloned();
        if let Some(i) = unattended
            .as_mut()
            .and_then(|u| u.get_mut("installer"))
            .and_then(Value::as_object_mut)
        {
            i.remove("image");
        }
        (machine, unattended)
    }

    /// `(major, minor)` of the Talos the config installs.
    fn talos_minor(&self) -> Option<(u32, u32)> {
        let tag = image_tag(&self.installer_image()?)?;
        let mut parts = tag.strip_prefix('v')?.split('.');
        Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
    }

    fn talos_version(&self) -> String {
        self.installer_image()
            .and_then(|i| image_tag(&i))
            .filter(|t| t.starts_with('v') && t[1..].split('.').count() >= 2)
            .unwrap_or_else(|| DEFAULT_TALOS_VERSION.to_string())
    }

    fn kubelet_version(&self) -> String {
        let kubelet = self
            .str_at("/machine/kubelet/image")
            .or_else(|| self.doc("KubeletConfig")?.get("image")?.as_str().map(String::from));
        let apiserver = self.str_at("/cluster/apiServer/image").or_else(|| {
            self.doc("KubeAPIServerConfig")?
                .get("image")?
                .as_str()
                .map(String::from)
        });
        kubelet.or(apiserver).and_then(|i| image_tag(&i)).unwrap_or_default()
    }

    fn string_map(value: Option<&Value>) -> BTreeMap<String, String> {
        value
            .and_then(Value::as_object)
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (k.clone(), v.as_str().map(String::from).unwrap_or_else(|| v.to_string())))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Talos < 1.14 adds the control-plane role label and taint itself; later versions write
    /// them in KubeNodeConfig.
    fn implicit_control_plane_defaults(&self) -> bool {
        self.is_control_plane() && self.doc("KubeNodeConfig").is_none()
    }

    fn labels(&self) -> BTreeMap<String, String> {
        let mut labels = match self.doc("KubeNodeConfig") {
            Some(d) => Self::string_map(d.get("labels")),
            None => Self::string_map(self.v1alpha1().and_then(|d| d.pointer("/machine/nodeLabels"))),
        };
        if self.implicit_control_plane_defaults() {
            labels
                .entry("node-role.kubernetes.io/control-plane".into())
                .or_default();
        }
        labels
    }

    fn taints(&self) -> Vec<Taint> {
        let raw = match self.doc("KubeNodeConfig") {
            Some(d) => Self::string_map(d.get("taints")),
            None => Self::string_map(self.v1alpha1().and_then(|d| d.pointer("/machine/nodeTaints"))),
        };
        let mut taints: Vec<Taint> = raw
            .into_iter()
            .map(|(key, v)| match v.rsplit_once(':') {
                Some((value, effect)) => Taint {
                    key,
                    value: Some(value.to_string()).filter(|v| !v.is_empty()),
                    effect: effect.to_string(),
                },
                None => Taint {
                    key,
                    value: None,
                    effect: v,
                },
            })
            .collect();
        let schedulable = self
            .v1alpha1()
            .and_then(|d| d.pointer("/cluster/allowSchedulingOnControlPlanes"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        if self.implicit_control_plane_defaults()
            && !schedulable
            && !taints.iter().any(|t| t.key == "node-role.kubernetes.io/control-plane")
        {
            taints.push(Taint {
                key: "node-role.kubernetes.io/control-plane".into(),
                value: None,
                effect: "NoSchedule".into(),
            });
        }
        taints.sort();
        taints
    }

    fn base64_pem(&self, pointer: &str) -> Option<String> {
        pki::decode_base64_pem(&self.str_at(pointer)?)
    }

    fn ca_cert_pem(&self) -> Option<String> {
        self.base64_pem("/machine/ca/crt")
    }

    fn ca_key_pem(&self) -> Option<String> {
        self.base64_pem("/machine/ca/key")
    }

    fn ca_certs(&self) -> Vec<CertificateDer<'static>> {
        self.ca_cert_pem()
            .and_then(|pem| pki::certificates(pem.as_bytes()).ok())
            .unwrap_or_default()
    }

    /// Against the schema of the Talos version the config installs.
    fn validate(&self) -> Result<(), Status> {
        let schema = crate::talos_schema::for_version(self.talos_minor());
        let errors: Vec<String> = self.docs.iter().flat_map(|d| schema.errors(d)).collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(Status::invalid_argument(format!(
                "configuration validation failed against the Talos {} schema:\n\t* {}",
                schema.name,
                errors.join("\n\t* ")
            )))
        }
    }
}

// ------------------------------------------------------------------------------- diff

/// Go's `time.Duration.String()` for whole seconds: `30s`, `1m0s`, `1h0m0s`.
fn go_duration(d: Duration) -> String {
    let s = d.as_secs();
    match (s / 3600, s / 60 % 60, s % 60) {
        (0, 0, sec) => format!("{sec}s"),
        (0, m, sec) => format!("{m}m{sec}s"),
        (h, m, sec) => format!("{h}h{m}m{sec}s"),
    }
}

/// A unified diff (`--- a`, `+++ b`, hunks with three lines of context) as Talos's configdiff
/// prints it; empty when the texts are equal.
fn unified_diff(old: &str, new: &str) -> String {
    let a: Vec<&str> = old.split_inclusive('\n').collect();
    let b: Vec<&str> = new.split_inclusive('\n').collect();
    if a == b {
        return String::new();
    }
    // (kind, line): ' ' both, '-' old only, '+' new only.
    let mut ops: Vec<(char, &str)> = Vec::with_capacity(a.len() + b.len());
    if a.len().saturating_mul(b.len()) > 16_000_000 {
        ops.extend(a.iter().map(|l| ('-', *l)));
        ops.extend(b.iter().map(|l| ('+', *l)));
    } else {
        // lcs[i][j]: longest common subsequence of a[i..] and b[j..].
        let w = b.len() + 1;
        let mut lcs = vec![0u32; (a.len() + 1) * w];
        for i in (0..a.len()).rev() {
            for j in (0..b.len()).rev() {
                lcs[i * w + j] = if a[i] == b[j] {
                    lcs[(i + 1) * w + j + 1] + 1
                } else {
                    lcs[(i + 1) * w + j].max(lcs[i * w + j + 1])
                };
            }
        }
        let (mut i, mut j) = (0, 0);
        while i < a.len() || j < b.len() {
            if i < a.len() && j < b.len() && a[i] == b[j] {
                ops.push((' ', a[i]));
                i += 1;
                j += 1;
            } else if j == b.len() || (i < a.len() && lcs[(i + 1) * w + j] >= lcs[i * w + j + 1]) {
                ops.push(('-', a[i]));
                i += 1;
            } else {
                ops.push(('+', b[j]));
                j += 1;
            }
        }
    }
    const CONTEXT: usize = 3;
    let changes: Vec<usize> = ops
        .iter()
        .enumerate()
        .filter(|(_, (k, _))| *k != ' ')
        .map(|(i, _)| i)
        .collect();
    let mut hunks: Vec<(usize, usize)> = Vec::new();
    for &c in &changes {
        let start = c.saturating_sub(CONTEXT);
        let end = (c + CONTEXT + 1).min(ops.len());
        match hunks.last_mut() {
            Some(last) if start <= last.1 => last.1 = end,
            _ => hunks.push((start, end)),
        }
    }
    let mut out = String::from("--- a\n+++ b\n");
    for (start, end) in hunks {
        let from_line = 1 + ops[..start].iter().filter(|(k, _)| *k != '+').count();
        let to_line = 1 + ops[..start].iter().filter(|(k, _)| *k != '-').count();
        let from_count = ops[start..end].iter().filter(|(k, _)| *k != '+').count();
        let to_count = ops[start..end].iter().filter(|(k, _)| *k != '-').count();
        let range = |line: usize, count: usize| {
            if count > 1 {
                format!("{line},{count}")
            } else {
                line.to_string()
            }
        };
        out.push_str(&format!(
            "@@ -{} +{} @@\n",
            range(from_line, from_count),
            range(to_line, to_count)
        ));
        for (kind, line) in &ops[start..end] {
            out.push(*kind);
            out.push_str(line);
            if !line.ends_with('\n') {
                out.push_str("\n\\ No newline at end of file\n");
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diffs_look_like_talos_configdiff() {
        assert_eq!(unified_diff("a\nb\n", "a\nb\n"), "");
        let old =
            "version: v1alpha1\nmachine:\n    type: controlplane\n    token: foo\n    certSANs: []\ncluster: null\n";
        let new = old.replace("controlplane", "worker");
        // The expectation of Talos's own configdiff test ("updated field").
        assert_eq!(
            unified_diff(old, &new),
            "--- a\n+++ b\n@@ -1,6 +1,6 @@\n version: v1alpha1\n machine:\n-    type: controlplane\n+    type: worker\n     token: foo\n     certSANs: []\n cluster: null\n"
        );
        let added = format!("{old}---\napiVersion: v1alpha1\nkind: SideroLinkConfig\napiUrl: https://example.com\n");
        assert_eq!(
            unified_diff(old, &added),
            "--- a\n+++ b\n@@ -4,3 +4,7 @@\n     token: foo\n     certSANs: []\n cluster: null\n+---\n+apiVersion: v1alpha1\n+kind: SideroLinkConfig\n+apiUrl: https://example.com\n"
        );
    }

    #[test]
    fn go_durations() {
        assert_eq!(go_duration(Duration::from_secs(60)), "1m0s");
        assert_eq!(go_duration(Duration::from_secs(30)), "30s");
        assert_eq!(go_duration(Duration::from_secs(3725)), "1h2m5s");
    }

    #[test]
    fn taints_and_labels_read_like_talos() {
        let c = Config::parse(
            "version: v1alpha1\nmachine:\n  type: controlplane\n  nodeLabels:\n    a: b\n  nodeTaints:\n    dedicated: storage:NoSchedule\n    x: NoExecute\n  install:\n    image: ghcr.io/siderolabs/installer:v1.13.9\n  kubelet:\n    image: ghcr.io/siderolabs/kubelet:v1.34.1\ncluster: {}\n---\napiVersion: v1alpha1\nkind: HostnameConfig\nhostname: cp-1\n",
        )
        .unwrap();
        assert_eq!(c.hostname().as_deref(), Some("cp-1"));
        assert_eq!(c.kubelet_version(), "v1.34.1");
        assert_eq!(c.talos_version(), "v1.13.9");
        assert_eq!(c.talos_minor(), Some((1, 13)));
        assert_eq!(c.labels()["a"], "b");
        assert_eq!(c.labels()["node-role.kubernetes.io/control-plane"], "");
        let taints: Vec<String> = c.taints().iter().map(|t| t.to_string()).collect();
        assert_eq!(
            taints,
            [
                "dedicated=storage:NoSchedule",
                "node-role.kubernetes.io/control-plane:NoSchedule",
                "x:NoExecute"
            ]
        );
    }
}
