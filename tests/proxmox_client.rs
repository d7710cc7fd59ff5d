//! The Proxmox API client against a small fake server (HTTP and HTTPS) defined here: TLS trust
//! modes, token handling, retries, the concurrency bound, task polling and error mapping.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use driftless::adapters::proxmox::{ApiToken, ClientOptions, ProxmoxClient};
use driftless::adapters::tls::{TlsTrust, normalize_fingerprint};
use driftless::pki::fingerprint_of_der;
use driftless::ports::{PowerAction, ProxmoxApi, ProxmoxError, PveKind, Upid};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::{Value, json};

const SECRET: &str = "5f2a9c1e-7d3b-4e8f-a1b2-c3d4e5f6a7b8";
const TOKEN: &str = "root@pam!driftless=5f2a9c1e-7d3b-4e8f-a1b2-c3d4e5f6a7b8";

// ---------------------------------------------------------------- the fake server

#[derive(Debug, Clone)]
struct Seen {
    /// 0-based arrival order.
    n: usize,
    method: String,
    /// Path and query exactly as sent (percent-encoding kept).
    uri: String,
    auth: Option<String>,
    body: String,
}

struct Reply {
    status: u16,
    reason: Option<String>,
    body: Value,
    delay: Duration,
}

impl Reply {
    fn data(data: Value) -> Reply {
        Reply {
            status: 200,
            reason: None,
            body: json!({ "data": data }),
            delay: Duration::ZERO,
        }
    }
    fn error(status: u16, reason: &str, body: Value) -> Reply {
        Reply {
            status,
            reason: Some(reason.to_string()),
            body,
            delay: Duration::ZERO,
        }
    }
}

type Handler = Arc<dyn Fn(&Seen) -> Reply + Send + Sync>;

struct Shared {
    seen: Mutex<Vec<Seen>>,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    handler: Handler,
}

struct Fake {
    url: String,
    shared: Arc<Shared>,
}

impl Fake {
    fn seen(&self) -> Vec<Seen> {
        self.shared.seen.lock().unwrap().clone()
    }
    fn count(&self) -> usize {
        self.shared.seen.lock().unwrap().len()
    }
    fn max_in_flight(&self) -> usize {
        self.shared.max_in_flight.load(Ordering::SeqCst)
    }
}

async fn handle(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let now = shared.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    shared.max_in_flight.fetch_max(now, Ordering::SeqCst);
    let method = request.method().to_string();
    let uri = request
        .uri()
        .path_and_query()
        .map(|p| p.to_string())
        .unwrap_or_default();
    let auth = request
        .headers()
        .get("authorization")
        .map(|v| v.to_str().unwrap().to_string());
    let body = axum::body::to_bytes(request.into_body(), usize::MAX).await.unwrap();
    let seen = {
        let mut all = shared.seen.lock().unwrap();
        let seen = Seen {
            n: all.len(),
            method,
            uri,
            auth,
            body: String::from_utf8_lossy(&body).into_owned(),
        };
        all.push(seen.clone());
        seen
    };
    let reply = (shared.handler)(&seen);
    if !reply.delay.is_zero() {
        tokio::time::sleep(reply.delay).await;
    }
    shared.in_flight.fetch_sub(1, Ordering::SeqCst);
    let mut response = (StatusCode::from_u16(reply.status).unwrap(), axum::Json(reply.body)).into_response();
    if let Some(reason) = reply.reason {
        response
            .extensions_mut()
            .insert(hyper::ext::ReasonPhrase::try_from(reason).unwrap());
    }
    response
}

fn router(handler: Handler) -> (Router, Arc<Shared>) {
    let shared = Arc::new(Shared {
        seen: Mutex::new(Vec::new()),
        in_flight: AtomicUsize::new(0),
        max_in_flight: AtomicUsize::new(0),
        handler,
    });
    (Router::new().fallback(handle).with_state(shared.clone()), shared)
}

async fn serve_http(handler: impl Fn(&Seen) -> Reply + Send + Sync + 'static) -> Fake {
    let (router, shared) = router(Arc::new(handler));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    Fake { url, shared }
}

/// A server certificate (and the DER of the certificate that proves it).
struct ServerCert {
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
}

fn self_signed() -> ServerCert {
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    ServerCert {
        cert: cert.der().clone(),
        key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    }
}

/// A CA (its PEM) and a server certificate it signed.
fn ca_and_leaf() -> (String, ServerCert) {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Proxmox Virtual Environment test CA");
    let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&leaf_key, &ca)
        .unwrap();
    let cert = ServerCert {
        cert: leaf.der().clone(),
        key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der())),
    };
    (ca.pem(), cert)
}

async fn serve_https(cert: ServerCert, handler: impl Fn(&Seen) -> Reply + Send + Sync + 'static) -> Fake {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert], cert.key)
        .unwrap();
    serve_https_with(config, handler).await
}

/// A certificate that is not the server's, shown with the server's own key: what someone
/// who copied a certificate (they are public) can do without its private key.
#[derive(Debug)]
struct Stolen(Arc<rustls::sign::CertifiedKey>);

impl rustls::server::ResolvesServerCert for Stolen {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }
}

async fn serve_stolen(
    stolen: CertificateDer<'static>,
    handler: impl Fn(&Seen) -> Reply + Send + Sync + 'static,
) -> Fake {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let own = self_signed();
    let key = provider.key_provider.load_private_key(own.key).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(Stolen(Arc::new(rustls::sign::CertifiedKey::new(
            vec![stolen],
            key,
        )))));
    serve_https_with(config, handler).await
}

async fn serve_https_with(
    mut config: rustls::ServerConfig,
    handler: impl Fn(&Seen) -> Reply + Send + Sync + 'static,
) -> Fake {
    let (router, shared) = router(Arc::new(handler));
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let url = format!("https://{}", listener.local_addr().unwrap());
    let server = axum_server::from_tcp_rustls(
        listener,
        axum_server::tls_rustls::RustlsConfig::from_config(Arc::new(config)),
    )
    .unwrap();
    tokio::spawn(async move { server.serve(router.into_make_service()).await.unwrap() });
    Fake { url, shared }
}

fn version_handler(_: &Seen) -> Reply {
    Reply::data(json!({ "version": "9.1.3", "release": "9.1", "repoid": "abc" }))
}

fn options(urls: &[&str], trust: TlsTrust) -> ClientOptions {
    let mut options = ClientOptions::new(
        urls.iter().map(|u| u.to_string()).collect(),
        ApiToken::parse(TOKEN).unwrap(),
        trust,
    );
    options.backoff = Duration::from_millis(1);
    options.timeout = Duration::from_secs(10);
    options.task_poll_interval = Duration::from_millis(5);
    options
}

fn client(urls: &[&str], trust: TlsTrust) -> ProxmoxClient {
    ProxmoxClient::new(options(urls, trust)).unwrap()
}

fn assert_no_secret(text: &str) {
    assert!(!text.contains(SECRET), "the token secret leaked: {text}");
    assert!(!text.contains("5f2a9c1e"), "part of the token secret leaked: {text}");
}

// ---------------------------------------------------------------- TLS

#[tokio::test]
async fn pinned_fingerprint_that_matches_is_accepted() {
    let cert = self_signed();
    // As `pvenode cert info` prints it, and lowercase without colons.
    let pin = fingerprint_of_der(cert.cert.as_ref());
    let bare = pin.replace(':', "").to_lowercase();
    assert_eq!(normalize_fingerprint(&bare).unwrap(), pin);
    let fake = serve_https(cert, version_handler).await;
    for pin in [pin.clone(), bare] {
        let client = client(&[&fake.url], TlsTrust::Fingerprint(pin));
        assert_eq!(client.version().await.unwrap(), "9.1.3");
    }
}

#[tokio::test]
async fn pinned_fingerprint_that_does_not_match_is_refused_naming_both() {
    let cert = self_signed();
    let presented = fingerprint_of_der(cert.cert.as_ref());
    let other = fingerprint_of_der(self_signed().cert.as_ref());
    let fake = serve_https(cert, version_handler).await;
    let client = client(&[&fake.url], TlsTrust::Fingerprint(other.to_lowercase()));
    let err = client.version().await.unwrap_err();
    let ProxmoxError::Transport { endpoint, message } = &err else {
        panic!("expected a transport error, got {err:?}")
    };
    assert_eq!(endpoint, &fake.url);
    assert!(message.contains(&other), "expected fingerprint missing: {message}");
    assert!(message.contains(&presented), "presented fingerprint missing: {message}");
    assert_eq!(
        fake.count(),
        0,
        "no request may reach a server that failed verification"
    );
    assert_eq!(client.request_count(), 1, "a refused certificate is not retried");
}

#[tokio::test]
async fn ca_file_is_the_trust_root() {
    let (ca_pem, cert) = ca_and_leaf();
    let fake = serve_https(cert, version_handler).await;
    let dir = tempfile::tempdir().unwrap();
    let ca_path = dir.path().join("pve-root-ca.pem");
    std::fs::write(&ca_path, &ca_pem).unwrap();
    let client = client(&[&fake.url], TlsTrust::CaFile(ca_path.clone()));
    assert_eq!(client.version().await.unwrap(), "9.1.3");
    // The hostname is checked too: localhost is in the certificate.
    let by_name = fake.url.replace("127.0.0.1", "localhost");
    assert_eq!(
        self::client(&[&by_name], TlsTrust::CaFile(ca_path))
            .version()
            .await
            .unwrap(),
        "9.1.3"
    );
}

#[tokio::test]
async fn a_wrong_ca_is_refused() {
    let (_, cert) = ca_and_leaf();
    let (other_ca, _) = ca_and_leaf();
    let fake = serve_https(cert, version_handler).await;
    let dir = tempfile::tempdir().unwrap();
    let ca_path = dir.path().join("other-ca.pem");
    std::fs::write(&ca_path, &other_ca).unwrap();
    let client = client(&[&fake.url], TlsTrust::CaFile(ca_path));
    let err = client.version().await.unwrap_err();
    assert!(
        matches!(&err, ProxmoxError::Transport { message, .. } if message.contains("certificate")),
        "{err:?}"
    );
    assert_eq!(fake.count(), 0);
    // And a self-signed certificate is not trusted by a CA file either.
    let self_signed_fake = serve_https(self_signed(), version_handler).await;
    let dir2 = tempfile::tempdir().unwrap();
    let ca_path = dir2.path().join("ca.pem");
    std::fs::write(&ca_path, &other_ca).unwrap();
    assert!(
        self::client(&[&self_signed_fake.url], TlsTrust::CaFile(ca_path))
            .version()
            .await
            .is_err()
    );
}

#[tokio::test]
async fn a_ca_file_without_certificates_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("empty.pem");
    std::fs::write(&path, "not a certificate\n").unwrap();
    let err = ProxmoxClient::new(options(&["https://127.0.0.1:8006"], TlsTrust::CaFile(path))).unwrap_err();
    assert!(err.to_string().contains("empty.pem"), "{err}");
    let missing = dir.path().join("missing.pem");
    assert!(ProxmoxClient::new(options(&["https://127.0.0.1:8006"], TlsTrust::CaFile(missing))).is_err());
}

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn insecure_accepts_anything_and_warns_at_every_build() {
    let fake = serve_https(self_signed(), version_handler).await;
    let logs = Captured::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let (first, second) = tracing::subscriber::with_default(subscriber, || {
        (
            ProxmoxClient::new(options(&[&fake.url], TlsTrust::Insecure)).unwrap(),
            ProxmoxClient::new(options(&[&fake.url], TlsTrust::Insecure)).unwrap(),
        )
    });
    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert_eq!(text.matches("TLS verification DISABLED").count(), 2, "{text}");
    assert!(text.contains("WARN"), "{text}");
    assert_eq!(first.version().await.unwrap(), "9.1.3");
    assert_eq!(second.version().await.unwrap(), "9.1.3");
}

#[tokio::test]
async fn a_copied_certificate_without_its_key_is_refused_pinned_or_insecure() {
    // The Proxmox node's certificate, copied by someone without its private key.
    let real = self_signed();
    let pin = fingerprint_of_der(real.cert.as_ref());
    let fake = serve_stolen(real.cert.clone(), version_handler).await;
    for trust in [TlsTrust::Fingerprint(pin), TlsTrust::Insecure] {
        let client = client(&[&fake.url], trust.clone());
        let err = client.version().await.unwrap_err();
        let ProxmoxError::Transport { message, .. } = &err else {
            panic!("{trust:?}: expected a transport error, got {err:?}")
        };
        assert!(message.contains("BadSignature"), "{trust:?}: {message}");
        assert_eq!(
            client.request_count(),
            1,
            "{trust:?}: a refused handshake is not retried"
        );
    }
    assert_eq!(fake.count(), 0, "no request reached it");
}

// ---------------------------------------------------------------- token

#[tokio::test]
async fn token_header_is_sent_and_the_secret_never_shows() {
    // A hostile server echoes the Authorization header back in its error message.
    let fake = serve_http(|seen: &Seen| {
        let auth = seen.auth.clone().unwrap_or_default();
        Reply::error(
            400,
            &format!("bad request {auth}"),
            json!({ "errors": { "token": auth }, "message": auth }),
        )
    })
    .await;
    let client = client(&[&fake.url], TlsTrust::System);
    let err = client.read_config("pve", PveKind::Lxc, 100).await.unwrap_err();
    assert_eq!(
        fake.seen()[0].auth.as_deref(),
        Some(format!("PVEAPIToken={TOKEN}").as_str())
    );
    let ProxmoxError::Api { status, what, message } = &err else {
        panic!("{err:?}")
    };
    assert_eq!(*status, 400);
    assert_eq!(what, "GET /nodes/pve/lxc/100/config");
    assert!(message.contains("root@pam!driftless=<redacted>"), "{message}");
    assert_no_secret(&err.to_string());
    assert_no_secret(&format!("{err:?}"));
    assert_no_secret(&format!("{client:?}"));
    assert_no_secret(&format!("{:?}", options(&[&fake.url], TlsTrust::System)));

    // A transport error (nothing listening) does not carry it either.
    let closed = closed_port_url().await;
    let err = self::client(&[&closed], TlsTrust::System)
        .list_guests()
        .await
        .unwrap_err();
    assert!(matches!(err, ProxmoxError::Transport { .. }), "{err:?}");
    assert_no_secret(&format!("{err} {err:?}"));
}

#[test]
fn token_parsing_and_sources() {
    for text in [
        TOKEN.to_string(),
        format!("PVEAPIToken={TOKEN}"),
        format!("  {TOKEN}\n"),
    ] {
        let token = ApiToken::parse(&text).unwrap();
        assert_eq!(token.id(), "root@pam!driftless");
        assert_eq!(token.user(), "root@pam");
        assert_eq!(token.token_name(), "driftless");
        assert_eq!(token.expose_secret(), SECRET);
        assert_eq!(format!("{token:?}"), "root@pam!driftless=<redacted>");
        assert_eq!(format!("{token}"), "root@pam!driftless=<redacted>");
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("token");
    std::fs::write(&path, format!("{TOKEN}\n")).unwrap();
    assert_eq!(ApiToken::from_file(&path).unwrap().expose_secret(), SECRET);
    let err = ApiToken::from_env("DRIFTLESS_TEST_TOKEN_THAT_IS_NOT_SET").unwrap_err();
    assert!(
        err.to_string().contains("DRIFTLESS_TEST_TOKEN_THAT_IS_NOT_SET"),
        "{err}"
    );
    for bad in [
        SECRET.to_string(),
        format!("root@pam!{SECRET}"),
        format!("root@pam!dri ftless={SECRET}"),
    ] {
        let err = ApiToken::parse(&bad).unwrap_err();
        assert_no_secret(&format!("{err} {err:?}"));
    }
    std::fs::write(&path, format!("rootpam!x={SECRET}")).unwrap();
    let err = ApiToken::from_file(&path).unwrap_err();
    assert_no_secret(&format!("{err} {err:?}"));
}

// ---------------------------------------------------------------- retries, endpoints, bound

#[tokio::test]
async fn get_is_retried_on_500_then_succeeds() {
    let fake = serve_http(|seen: &Seen| {
        if seen.n < 2 {
            Reply::error(500, "proxy loop detected", json!({ "data": null }))
        } else {
            Reply::data(json!([{ "id": "lxc/100", "type": "lxc", "vmid": 100, "node": "pve", "status": "running" }]))
        }
    })
    .await;
    let client = client(&[&fake.url], TlsTrust::System);
    let guests = client.list_guests().await.unwrap();
    assert_eq!(guests.len(), 1);
    assert_eq!(fake.count(), 3);
    assert_eq!(client.request_count(), 3);
    assert!(
        fake.seen()
            .iter()
            .all(|s| s.uri == "/api2/json/cluster/resources?type=vm")
    );
}

#[tokio::test]
async fn get_gives_up_after_the_retries_and_reports_the_reason() {
    let fake = serve_http(|_: &Seen| Reply::error(503, "service busy", json!({ "data": null }))).await;
    let mut options = options(&[&fake.url], TlsTrust::System);
    options.retries = 2;
    let client = ProxmoxClient::new(options).unwrap();
    let err = client.list_guests().await.unwrap_err();
    assert_eq!(
        err,
        ProxmoxError::Api {
            status: 503,
            what: "GET /cluster/resources".to_string(),
            message: "service busy".to_string()
        }
    );
    assert_eq!(fake.count(), 3);
}

#[tokio::test]
async fn post_put_delete_are_never_retried() {
    let fake = serve_http(|_: &Seen| Reply::error(500, "got timeout", json!({ "data": null }))).await;
    let client = client(&[&fake.url], TlsTrust::System);
    let params = BTreeMap::from([("vmid".to_string(), "100".to_string())]);
    let err = client.create("pve", PveKind::Lxc, &params).await.unwrap_err();
    assert!(
        matches!(&err, ProxmoxError::Api { status: 500, what, .. } if what == "POST /nodes/pve/lxc"),
        "{err:?}"
    );
    assert_eq!(fake.count(), 1, "a POST must be sent exactly once");
    client
        .update_config("pve", PveKind::Lxc, 100, &BTreeMap::new(), &["mp0".to_string()], "")
        .await
        .unwrap_err();
    assert_eq!(fake.count(), 2);
    client.delete_guest("pve", PveKind::Lxc, 100).await.unwrap_err();
    assert_eq!(fake.count(), 3);
    client
        .power("pve", PveKind::Qemu, 101, PowerAction::Start)
        .await
        .unwrap_err();
    assert_eq!(fake.count(), 4);
    assert_eq!(client.request_count(), 4);
}

async fn closed_port_url() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    url
}

#[tokio::test]
async fn an_unreachable_endpoint_fails_over_to_the_next() {
    let dead = closed_port_url().await;
    let fake = serve_http(|seen: &Seen| {
        if seen.method == "POST" {
            Reply::data(json!("UPID:pve:00001:0002:65000000:vzstart:100:root@pam!driftless:"))
        } else {
            version_handler(seen)
        }
    })
    .await;
    let client = client(&[&dead, &fake.url], TlsTrust::System);
    assert_eq!(client.version().await.unwrap(), "9.1.3");
    assert_eq!(client.request_count(), 2);
    // The endpoint that answered is preferred from now on.
    assert_eq!(client.version().await.unwrap(), "9.1.3");
    assert_eq!(client.request_count(), 3);
    // A POST may move on too when the connection could not even be made (nothing was sent).
    let client = self::client(&[&dead, &fake.url], TlsTrust::System);
    client
        .power("pve", PveKind::Lxc, 100, PowerAction::Start)
        .await
        .unwrap();
    assert_eq!(client.request_count(), 2);
}

#[tokio::test]
async fn concurrency_bound_holds() {
    let fake = serve_http(|_: &Seen| Reply {
        delay: Duration::from_millis(60),
        ..Reply::data(json!([]))
    })
    .await;
    let mut options = options(&[&fake.url], TlsTrust::System);
    options.max_concurrent = 3;
    let client = Arc::new(ProxmoxClient::new(options).unwrap());
    let mut tasks = Vec::new();
    for _ in 0..12 {
        let client = client.clone();
        tasks.push(tokio::spawn(async move { client.list_guests().await }));
    }
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    assert_eq!(fake.count(), 12);
    assert_eq!(
        fake.max_in_flight(),
        3,
        "at most 3 requests in flight, and the bound is reached"
    );
}

// ---------------------------------------------------------------- calls and mapping

#[tokio::test]
async fn calls_map_to_the_api() {
    let fake = serve_http(|seen: &Seen| match (seen.method.as_str(), seen.uri.as_str()) {
        ("GET", "/api2/json/cluster/resources?type=vm") => Reply::data(json!([
            { "id": "lxc/100", "type": "lxc", "vmid": 100, "node": "pve", "name": "k3s-1", "status": "running",
              "tags": "driftless;k3s" },
            { "id": "qemu/200", "type": "qemu", "vmid": 200, "node": "pve2", "status": "stopped", "tags": "a,b c" },
            { "id": "storage/pve/local", "type": "storage", "node": "pve" },
        ])),
        ("GET", "/api2/json/nodes/pve/lxc/100/config") => Reply::data(json!({
            "hostname": "k3s-1", "cores": 2, "cpulimit": 1.5, "memory": 2048, "unprivileged": 1,
            "net0": "name=eth0,bridge=vmbr0,ip=dhcp", "digest": "0123456789abcdef0123456789abcdef01234567",
            "lxc": [["lxc.apparmor.profile", "unconfined"], ["lxc.cgroup2.devices.allow", "a"]],
        })),
        ("POST", "/api2/json/nodes/pve/lxc") => Reply::data(json!(
            "UPID:pve:0000A1B2:00C3D4E5:65F0A1B2:vzcreate:100:root@pam!driftless:"
        )),
        ("PUT", "/api2/json/nodes/pve/lxc/100/config") => Reply::data(Value::Null),
        ("POST", "/api2/json/nodes/pve/qemu/200/status/shutdown") => {
            Reply::data(json!("UPID:pve:1:2:3:qmshutdown:200:root@pam!driftless:"))
        }
        ("DELETE", "/api2/json/nodes/pve/lxc/100") => {
            Reply::data(json!("UPID:pve:1:2:3:vzdestroy:100:root@pam!driftless:"))
        }
        _ => Reply::error(
            501,
            &format!("Method '{} {}' not implemented", seen.method, seen.uri),
            json!({ "data": null }),
        ),
    })
    .await;
    let client = client(&[&fake.url], TlsTrust::System);

    let guests = client.list_guests().await.unwrap();
    assert_eq!(guests.len(), 2);
    assert_eq!(
        (guests[0].vmid, guests[0].kind, guests[0].node.as_str()),
        (100, PveKind::Lxc, "pve")
    );
    assert_eq!(guests[0].name.as_deref(), Some("k3s-1"));
    assert_eq!(guests[0].tags, vec!["driftless", "k3s"]);
    assert_eq!(
        (guests[1].kind, guests[1].status.as_str(), guests[1].name.clone()),
        (PveKind::Qemu, "stopped", None)
    );
    assert_eq!(guests[1].tags, vec!["a", "b", "c"]);

    let config = client.read_config("pve", PveKind::Lxc, 100).await.unwrap();
    assert_eq!(config.options["cores"], "2");
    assert_eq!(config.options["cpulimit"], "1.5");
    assert_eq!(config.options["memory"], "2048");
    assert_eq!(config.options["net0"], "name=eth0,bridge=vmbr0,ip=dhcp");
    assert!(!config.options.contains_key("digest") && !config.options.contains_key("lxc"));
    assert_eq!(config.digest, "0123456789abcdef0123456789abcdef01234567");
    assert_eq!(
        config.raw_lxc,
        vec![
            ("lxc.apparmor.profile".to_string(), "unconfined".to_string()),
            ("lxc.cgroup2.devices.allow".to_string(), "a".to_string())
        ]
    );

    let params = BTreeMap::from([
        ("vmid".to_string(), "100".to_string()),
        (
            "ostemplate".to_string(),
            "local:vztmpl/debian-12-standard_12.7-1_amd64.tar.zst".to_string(),
        ),
        ("net0".to_string(), "name=eth0,bridge=vmbr0,ip=dhcp".to_string()),
    ]);
    let upid = client.create("pve", PveKind::Lxc, &params).await.unwrap();
    assert_eq!(upid.node(), Some("pve"));

    let set = BTreeMap::from([("cores".to_string(), "4".to_string())]);
    let delete = vec!["mp0".to_string(), "description".to_string()];
    client
        .update_config("pve", PveKind::Lxc, 100, &set, &delete, &config.digest)
        .await
        .unwrap();
    client
        .power("pve", PveKind::Qemu, 200, PowerAction::Shutdown)
        .await
        .unwrap();
    client.delete_guest("pve", PveKind::Lxc, 100).await.unwrap();

    let seen = fake.seen();
    let create = seen
        .iter()
        .find(|s| s.method == "POST" && s.uri == "/api2/json/nodes/pve/lxc")
        .unwrap();
    let form: BTreeMap<String, String> = form_pairs(&create.body);
    assert_eq!(form, params);
    let put = seen.iter().find(|s| s.method == "PUT").unwrap();
    let form = form_pairs(&put.body);
    assert_eq!(form["cores"], "4");
    assert_eq!(form["delete"], "mp0,description");
    assert_eq!(form["digest"], config.digest);
    // An update without deletions or digest sends neither.
    client
        .update_config("pve", PveKind::Lxc, 100, &set, &[], "")
        .await
        .unwrap();
    let last = fake.seen().pop().unwrap();
    assert_eq!(form_pairs(&last.body).keys().collect::<Vec<_>>(), vec!["cores"]);
}

fn form_pairs(body: &str) -> BTreeMap<String, String> {
    body.split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap();
            (decode(k), decode(v))
        })
        .collect()
}

fn decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                out.push(u8::from_str_radix(&text[i + 1..i + 3], 16).unwrap());
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).unwrap()
}

#[tokio::test]
async fn digest_mismatch_and_parameter_errors_are_mapped() {
    let fake = serve_http(|seen: &Seen| {
        if seen.body.contains("digest=stale") {
            Reply::error(
                500,
                "detected modified configuration - file changed by other user? Try again.",
                json!({ "data": null }),
            )
        } else {
            Reply::error(
                400,
                "Parameter verification failed.",
                json!({ "data": null, "errors": { "cores": "value must have a minimum value of 1" } }),
            )
        }
    })
    .await;
    let client = client(&[&fake.url], TlsTrust::System);
    let set = BTreeMap::from([("cores".to_string(), "2".to_string())]);
    let err = client
        .update_config("pve", PveKind::Lxc, 100, &set, &[], "stale")
        .await
        .unwrap_err();
    assert_eq!(err, ProxmoxError::DigestMismatch);
    let set = BTreeMap::from([("cores".to_string(), "0".to_string())]);
    let err = client
        .update_config("pve", PveKind::Lxc, 100, &set, &[], "fresh")
        .await
        .unwrap_err();
    assert_eq!(
        err,
        ProxmoxError::Api {
            status: 400,
            what: "PUT /nodes/pve/lxc/100/config".to_string(),
            message: "Parameter verification failed. - cores: value must have a minimum value of 1".to_string(),
        }
    );
    assert_eq!(fake.count(), 2);
}

// ---------------------------------------------------------------- tasks

#[tokio::test]
async fn task_polling_reaches_ok_and_failures_are_task_failed() {
    let ok = "UPID:pve:0000A1B2:00C3D4E5:65F0A1B2:vzcreate:100:root@pam!driftless:";
    let bad = "UPID:pve:0000A1B3:00C3D4E6:65F0A1B3:vzstart:101:root@pam!driftless:";
    let polls = Arc::new(AtomicUsize::new(0));
    let counter = polls.clone();
    let fake = serve_http(move |seen: &Seen| {
        let encoded_ok = "/api2/json/nodes/pve/tasks/UPID%3Apve%3A0000A1B2%3A00C3D4E5%3A65F0A1B2%3Avzcreate%3A100%3Aroot%40pam%21driftless%3A/status";
        let encoded_bad = "/api2/json/nodes/pve/tasks/UPID%3Apve%3A0000A1B3%3A00C3D4E6%3A65F0A1B3%3Avzstart%3A101%3Aroot%40pam%21driftless%3A/status";
        if seen.uri == encoded_ok {
            let n = counter.fetch_add(1, Ordering::SeqCst);
            if n == 1 {
                // A transient error in the middle of polling is retried.
                return Reply::error(502, "Bad Gateway", json!({ "data": null }));
            }
            let status = if n < 3 { "running" } else { "stopped" };
            Reply::data(json!({ "status": status, "exitstatus": if n < 3 { Value::Null } else { json!("OK") },
                                "upid": ok, "node": "pve", "type": "vzcreate", "id": "100", "pid": 1, "pstart": 2,
                                "starttime": 3, "user": "root@pam!driftless" }))
        } else if seen.uri == encoded_bad {
            Reply::data(json!({ "status": "stopped", "exitstatus": "startup for container '101' failed", "upid": bad }))
        } else {
            Reply::error(404, &format!("no such path {}", seen.uri), json!({ "data": null }))
        }
    })
    .await;
    let client = client(&[&fake.url], TlsTrust::System);
    client.wait_task(&Upid(ok.to_string())).await.unwrap();
    assert_eq!(polls.load(Ordering::SeqCst), 4);
    let err = client.wait_task(&Upid(bad.to_string())).await.unwrap_err();
    assert_eq!(
        err,
        ProxmoxError::TaskFailed {
            upid: bad.to_string(),
            exit_status: "startup for container '101' failed".to_string()
        }
    );
    assert!(matches!(
        client.wait_task(&Upid("nonsense".to_string())).await,
        Err(ProxmoxError::Other(_))
    ));
}

/// Status polls of a container start that ends `runs` after Proxmox accepted it, waited for
/// with the default poll schedule against a loopback server.
async fn polls_of_a_task_that_runs(runs: Duration) -> usize {
    let upid = "UPID:pve:0000B1B2:00C3D4F5:65F0A1C2:vzstart:100:root@pam!driftless:";
    let accepted: Arc<Mutex<Option<std::time::Instant>>> = Arc::default();
    let polls = Arc::new(AtomicUsize::new(0));
    let (started, counter) = (accepted.clone(), polls.clone());
    let fake = serve_http(move |seen: &Seen| {
        if seen.method == "POST" && seen.uri == "/api2/json/nodes/pve/lxc/100/status/start" {
            *started.lock().unwrap() = Some(std::time::Instant::now());
            return Reply::data(json!(upid));
        }
        if seen.method == "GET" && seen.uri.starts_with("/api2/json/nodes/pve/tasks/") && seen.uri.ends_with("/status")
        {
            counter.fetch_add(1, Ordering::SeqCst);
            let since = started
                .lock()
                .unwrap()
                .expect("polled before the task was started")
                .elapsed();
            return if since >= runs {
                Reply::data(json!({ "status": "stopped", "exitstatus": "OK", "upid": upid }))
            } else {
                Reply::data(json!({ "status": "running", "upid": upid }))
            };
        }
        Reply::error(404, &format!("no such path {}", seen.uri), json!({ "data": null }))
    })
    .await;
    let defaults = ClientOptions::new(
        vec![fake.url.clone()],
        ApiToken::parse(TOKEN).unwrap(),
        TlsTrust::System,
    );
    let mut options = options(&[&fake.url], TlsTrust::System);
    options.task_poll_first = defaults.task_poll_first;
    options.task_poll_interval = defaults.task_poll_interval;
    let client = ProxmoxClient::new(options).unwrap();
    let task = client
        .power("pve", PveKind::Lxc, 100, PowerAction::Start)
        .await
        .unwrap();
    client.wait_task(&task).await.unwrap();
    polls.load(Ordering::SeqCst)
}

#[tokio::test]
async fn a_task_is_polled_at_once_then_at_a_quarter_of_the_time_waited() {
    // The default schedule polls at 0, 50, 100, 150, 200, 250, 312, 390, 488, 610 and 762 ms:
    // a task that ends after 700 ms is seen by the 11th poll, about 60 ms late. A slow
    // machine delays polls, so fewer fit before the end; never more. Pauses that double
    // from 50 ms would poll 5 times and see it at 750 ms, every 500 ms 3 times (at 1 s),
    // every 100 ms 8 times, every 50 ms 15 times.
    let polls = polls_of_a_task_that_runs(Duration::from_millis(700)).await;
    assert!(
        (9..=11).contains(&polls),
        "{polls} status polls of a task that ran 700 ms"
    );
    // A task done before its first poll costs that poll alone.
    assert_eq!(polls_of_a_task_that_runs(Duration::ZERO).await, 1);
}

#[tokio::test]
async fn task_timeout_is_respected() {
    let fake = serve_http(|_: &Seen| Reply::data(json!({ "status": "running" }))).await;
    let mut options = options(&[&fake.url], TlsTrust::System);
    options.task_timeout = Duration::from_millis(100);
    options.task_poll_interval = Duration::from_millis(20);
    let client = ProxmoxClient::new(options).unwrap();
    let started = std::time::Instant::now();
    let err = client
        .wait_task(&Upid("UPID:pve:1:2:3:vzstart:100:root@pam!driftless:".to_string()))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ProxmoxError::Other(m) if m.contains("still running")),
        "{err:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(fake.count() >= 2);
}

// ---------------------------------------------------------------- end to end against the sandbox

mod sandbox_e2e {
    use super::*;
    use driftless_sandbox::{self as sandbox, SandboxHandle, SandboxOptions};

    async fn start(dir: &std::path::Path) -> SandboxHandle {
        sandbox::start(SandboxOptions::new(dir.join("state"))).await.unwrap()
    }

    fn client_for(sb: &SandboxHandle, trust: TlsTrust) -> ProxmoxClient {
        let mut options = ClientOptions::new(vec![sb.url.clone()], ApiToken::parse(&sb.token).unwrap(), trust);
        options.backoff = Duration::from_millis(1);
        options.task_poll_interval = Duration::from_millis(10);
        options.task_timeout = Duration::from_secs(20);
        ProxmoxClient::new(options).unwrap()
    }

    fn create_params(vmid: u32) -> BTreeMap<String, String> {
        [
            ("vmid", vmid.to_string()),
            ("hostname", "k3s-server-1".to_string()),
            (
                "ostemplate",
                "local:vztmpl/debian-12-standard_12.7-1_amd64.tar.zst".to_string(),
            ),
            ("rootfs", "local-lvm:8".to_string()),
            ("memory", "1024".to_string()),
            ("cores", "2".to_string()),
            ("net0", "name=eth0,bridge=vmbr0,ip=dhcp".to_string()),
            ("tags", "driftless;k3s".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    #[tokio::test]
    async fn lxc_lifecycle_with_a_pinned_fingerprint() {
        let dir = tempfile::tempdir().unwrap();
        let sb = start(dir.path()).await;
        let client = client_for(&sb, TlsTrust::Fingerprint(sb.fingerprint.clone()));
        assert!(!client.version().await.unwrap().is_empty());

        let upid = client.create("pve", PveKind::Lxc, &create_params(150)).await.unwrap();
        assert!(upid.0.starts_with("UPID:pve:"), "{upid:?}");
        client.wait_task(&upid).await.unwrap();

        let guests = client.list_guests().await.unwrap();
        let guest = guests
            .iter()
            .find(|g| g.vmid == 150)
            .expect("the new container is listed");
        assert_eq!(
            (guest.kind, guest.node.as_str(), guest.status.as_str()),
            (PveKind::Lxc, "pve", "stopped")
        );
        assert_eq!(guest.name.as_deref(), Some("k3s-server-1"));
        assert_eq!(guest.tags, vec!["driftless", "k3s"]);

        let config = client.read_config("pve", PveKind::Lxc, 150).await.unwrap();
        assert_eq!(config.options["hostname"], "k3s-server-1");
        assert_eq!(config.options["cores"], "2");
        assert_eq!(config.options["memory"], "1024");
        assert_eq!(config.digest.len(), 40, "{config:?}");

        // Update with the digest just read.
        let set = BTreeMap::from([("cores".to_string(), "4".to_string())]);
        client
            .update_config("pve", PveKind::Lxc, 150, &set, &[], &config.digest)
            .await
            .unwrap();
        let updated = client.read_config("pve", PveKind::Lxc, 150).await.unwrap();
        assert_eq!(updated.options["cores"], "4");
        assert_ne!(updated.digest, config.digest);

        // The old digest is stale now.
        let set = BTreeMap::from([("memory".to_string(), "2048".to_string())]);
        let err = client
            .update_config("pve", PveKind::Lxc, 150, &set, &[], &config.digest)
            .await
            .unwrap_err();
        assert_eq!(err, ProxmoxError::DigestMismatch);

        // Someone edits the guest between our read and our write.
        let fresh = client.read_config("pve", PveKind::Lxc, 150).await.unwrap();
        sb.knobs().set_edit_between_read_and_write(true);
        let err = client
            .update_config("pve", PveKind::Lxc, 150, &set, &[], &fresh.digest)
            .await
            .unwrap_err();
        assert_eq!(err, ProxmoxError::DigestMismatch);

        // Delete an option.
        let fresh = client.read_config("pve", PveKind::Lxc, 150).await.unwrap();
        client
            .update_config(
                "pve",
                PveKind::Lxc,
                150,
                &BTreeMap::new(),
                &["tags".to_string()],
                &fresh.digest,
            )
            .await
            .unwrap();
        assert!(
            !client
                .read_config("pve", PveKind::Lxc, 150)
                .await
                .unwrap()
                .options
                .contains_key("tags")
        );

        // Power.
        let upid = client
            .power("pve", PveKind::Lxc, 150, PowerAction::Start)
            .await
            .unwrap();
        client.wait_task(&upid).await.unwrap();
        let status = |guests: Vec<driftless::ports::GuestSummary>| {
            guests
                .into_iter()
                .find(|g| g.vmid == 150)
                .map(|g| g.status)
                .unwrap_or_default()
        };
        assert_eq!(status(client.list_guests().await.unwrap()), "running");
        let err = client
            .power("pve", PveKind::Lxc, 150, PowerAction::Start)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, ProxmoxError::Api { status: 500, message, .. } if message.contains("already running")),
            "{err:?}"
        );
        let upid = client
            .power("pve", PveKind::Lxc, 150, PowerAction::Shutdown)
            .await
            .unwrap();
        client.wait_task(&upid).await.unwrap();
        assert_eq!(status(client.list_guests().await.unwrap()), "stopped");

        // Delete.
        let upid = client.delete_guest("pve", PveKind::Lxc, 150).await.unwrap();
        client.wait_task(&upid).await.unwrap();
        assert!(client.list_guests().await.unwrap().iter().all(|g| g.vmid != 150));
        let err = client.read_config("pve", PveKind::Lxc, 150).await.unwrap_err();
        assert!(matches!(err, ProxmoxError::Api { status: 500, .. }), "{err:?}");
        sb.shutdown().await;
    }

    #[tokio::test]
    async fn sandbox_ca_pem_works_as_a_ca_file_and_bad_tokens_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let sb = start(dir.path()).await;
        let ca = dir.path().join("pve-root-ca.pem");
        std::fs::write(&ca, &sb.ca_pem).unwrap();
        let client = client_for(&sb, TlsTrust::CaFile(ca));
        // The certificate names the node and loopback; either way the CA file must verify it.
        match client.list_guests().await {
            Ok(_) => {}
            Err(err) => panic!("CA file from the sandbox refused: {err}"),
        }

        let wrong = ApiToken::new("root@pam", "driftless", "00000000-0000-0000-0000-000000000000").unwrap();
        let options = ClientOptions::new(
            vec![sb.url.clone()],
            wrong,
            TlsTrust::Fingerprint(sb.fingerprint.clone()),
        );
        let err = ProxmoxClient::new(options).unwrap().list_guests().await.unwrap_err();
        assert!(matches!(err, ProxmoxError::Api { status: 401, .. }), "{err:?}");
        sb.shutdown().await;
    }

    #[tokio::test]
    async fn injected_errors_are_retried_for_reads_only() {
        let dir = tempfile::tempdir().unwrap();
        let sb = start(dir.path()).await;
        let client = client_for(&sb, TlsTrust::Fingerprint(sb.fingerprint.clone()));
        sb.knobs().set_error_rate(0.3);
        for _ in 0..10 {
            client.list_guests().await.unwrap();
        }
        assert!(client.request_count() > 10, "some reads were retried");
        assert_eq!(client.request_count(), sb.knobs().total_requests());
        sb.knobs().set_error_rate(1.0);
        let before = client.request_count();
        let err = client
            .create("pve", PveKind::Lxc, &create_params(151))
            .await
            .unwrap_err();
        assert!(matches!(err, ProxmoxError::Api { status: 500, .. }), "{err:?}");
        assert_eq!(client.request_count(), before + 1, "a create is sent once");
        sb.shutdown().await;
    }
}
