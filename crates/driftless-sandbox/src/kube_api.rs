//! The simulated Kubernetes API server: the subset of kube-apiserver that driftless, kube-rs
//! and kubectl use, served over HTTPS. Nodes come from the node files under
//! `STATE/.sandbox/k8s/` ([`cluster_state`](crate::cluster_state)), every other object from the
//! object store beside them (`objects`), both re-read on every request.
//!
//! * Discovery (`/api`, `/api/v1`, `/apis`, `/apis/{group}[/{version}]`) of the built-in groups
//!   (`resources`), K3s's `helm.cattle.io` on a K3s cluster, and every Established CRD's kinds;
//!   `/openapi/v3` for what kubectl checks before applying (`openapi`).
//! * Get, list (label and field selectors, `watch`, Table answers for kubectl), create, replace,
//!   merge/strategic-merge/JSON patches, server-side apply with managedFields and conflicts,
//!   dry runs, delete and delete-collection, the status subresource (`handlers`, `fields`).
//! * Simulated controllers (`controllers`): CRDs Established, workloads rolled out, Jobs
//!   completed, HelmCharts installed, namespaces emptied, garbage collection; pods derived from
//!   the workloads.
//! * A cluster configured without a CNI (`cluster_state::builtin_cni`), when the sandbox
//!   enforces it (`require-cni`), has NotReady nodes until a CNI add-on runs.
//! * PKI like K3s: its own CA and a server certificate signed by it (SANs `127.0.0.1`,
//!   `localhost`, `kubernetes`, `kubernetes.default`); a static bearer token derived from the
//!   seed; `admin.kubeconfig` written in the shape of K3s's `k3s.yaml`.
//! * Errors are `Status` objects as kube-apiserver sends them (401 Unauthorized, 404
//!   NotFound, 409 Conflict, 415, 422 Invalid with the field path).
//! * A node is Ready when its kubelet runs, its guest runs and it is not listed in
//!   `never-ready`. A stopped kubelet or guest reads like the node controller's verdict
//!   (`Ready` `Unknown`, "Kubelet stopped posting node status."); a never-ready node like a
//!   kubelet without CNI (`Ready` `False`, `KubeletNotReady`), as is every node of a cluster with
//!   no CNI running. `/readyz` passes while a control plane node's kubelet runs.
//! * Labels the kubelet and K3s set (`kubernetes.io/hostname`, `kubernetes.io/os`, the
//!   control-plane role: `"true"` on K3s servers, `""` on Talos control planes) are added
//!   to the node's own; a merge patch changes the node's own labels, annotations and taints
//!   (other fields are not simulated and are refused with 422).
//! * `kube-system` pods are synthesised: K3s's packaged components, or Talos's CoreDNS and
//!   kube-apiserver static pods; Running when a control plane node is Ready, else Pending.

mod controllers;
mod fields;
mod handlers;
mod objects;
mod openapi;
mod resources;
mod table;
mod watch;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::Response;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use crate::SandboxError;
use crate::cluster_state::{self, SimNode};
use crate::store::{self, Store, atomic_write};
use crate::tls::{self, SelfSigned};
use driftless::ports::Taint;

/// A running simulated API server. Dropping it leaves the server running until the
/// runtime ends; call [`KubeApiHandle::shutdown`] to stop it.
pub struct KubeApiHandle {
    /// `https://127.0.0.1:PORT`.
    pub url: String,
    pub addr: SocketAddr,
    /// The cluster CA (PEM): what `certificate-authority-data` holds.
    pub ca_pem: String,
    /// The accepted bearer token.
    pub token: String,
    /// Where the admin kubeconfig was written.
    pub kubeconfig_path: PathBuf,
    handle: axum_server::Handle<SocketAddr>,
    join: tokio::task::JoinHandle<()>,
    controllers: tokio::task::JoinHandle<()>,
}

impl KubeApiHandle {
    /// Stop serving (open connections get two seconds to finish) and the controllers.
    pub async fn shutdown(self) {
        self.controllers.abort();
        self.handle.graceful_shutdown(Some(Duration::from_secs(2)));
        let _ = self.join.await;
    }
}

impl fmt::Debug for KubeApiHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KubeApiHandle")
            .field("url", &self.url)
            .field("token", &"<redacted>")
            .field("kubeconfig_path", &self.kubeconfig_path)
            .finish_non_exhaustive()
    }
}

/// The bearer token the API server accepts, a function of the seed.
pub fn token(seed: u64) -> String {
    format!(
        "driftless-sandbox.{}",
        store::uuid_from(seed, "kube-api-token").replace('-', "")
    )
}

/// Serve the API on `bind` and write the admin kubeconfig.
pub async fn serve(state_dir: PathBuf, bind: SocketAddr, seed: u64) -> Result<KubeApiHandle, SandboxError> {
    let bind_err = |source| SandboxError::Bind { addr: bind, source };
    let listener = std::net::TcpListener::bind(bind).map_err(bind_err)?;
    listener.set_nonblocking(true).map_err(bind_err)?;
    let addr = listener.local_addr().map_err(bind_err)?;
    let host = if addr.ip().is_unspecified() {
        "127.0.0.1".to_string()
    } else if addr.is_ipv6() {
        format!("[{}]", addr.ip())
    } else {
        addr.ip().to_string()
    };
    let url = format!("https://{host}:{}", addr.port());

    let (ca_pem, server_cert) = kept_pki(&state_dir, &addr)?;
    let token = token(seed);
    let kubeconfig_path = cluster_state::admin_kubeconfig_path(&state_dir);
    if let Some(dir) = kubeconfig_path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| SandboxError::Io {
            path: dir.to_path_buf(),
            source: e,
        })?;
    }
    atomic_write(&kubeconfig_path, kubeconfig(&url, &ca_pem, &token).as_bytes()).map_err(|e| SandboxError::Io {
        path: kubeconfig_path.clone(),
        source: e,
    })?;

    let shared = Arc::new(Shared {
        state_dir,
        token: token.clone(),
        seed,
        started: now(),
        first_seen: Mutex::new(BTreeMap::new()),
        patch_lock: tokio::sync::Mutex::new(()),
        ca_pem: ca_pem.clone(),
        url: url.clone(),
    });
    {
        let _guard = shared.patch_lock.lock().await;
        controllers::seed_namespaces(&shared, &objects::Objects::new(&shared.state_dir));
    }
    let controllers = tokio::spawn(controllers::run(shared.clone()));
    let app = axum::Router::new().fallback(entry).with_state(shared);
    let handle = axum_server::Handle::new();
    let config = axum_server::tls_rustls::RustlsConfig::from_config(server_cert.server_config()?);
    let server = axum_server::tls_rustls::from_tcp_rustls(listener, config)
        .map_err(bind_err)?
        .http1_only()
        .handle(handle.clone());
    let join = tokio::spawn(async move {
        if let Err(e) = server.serve(app.into_make_service()).await {
            tracing::warn!("sandbox Kubernetes API stopped: {e}");
        }
    });
    Ok(KubeApiHandle {
        url,
        addr,
        ca_pem,
        token,
        kubeconfig_path,
        handle,
        join,
        controllers,
    })
}

/// The CA and server certificate an earlier start on this state made, or new ones, kept
/// for the next start: a restarted API keeps its CA, so kubeconfigs made before still work.
fn kept_pki(state_dir: &std::path::Path, addr: &SocketAddr) -> Result<(String, SelfSigned), SandboxError> {
    let dir = tls::dir(state_dir);
    let ca_path = dir.join("kube-ca.pem");
    let mut made_ca = None;
    let server = SelfSigned::kept(&dir, "kube-server", || {
        let (ca, server) = pki(addr)?;
        made_ca = Some(ca);
        Ok(server)
    })?;
    match made_ca {
        Some(ca) => {
            atomic_write(&ca_path, ca.as_bytes()).map_err(|e| SandboxError::io(&ca_path, e))?;
            Ok((ca, server))
        }
        None => match std::fs::read_to_string(&ca_path) {
            Ok(ca) => Ok((ca, server)),
            // A server certificate without its CA: make both again.
            Err(_) => {
                let (ca, server) = pki(addr)?;
                atomic_write(&ca_path, ca.as_bytes()).map_err(|e| SandboxError::io(&ca_path, e))?;
                Ok((ca, server))
            }
        },
    }
}

/// A CA (PEM) and the server certificate it signed.
fn pki(addr: &SocketAddr) -> Result<(String, SelfSigned), SandboxError> {
    let tls_err = |e: rcgen::Error| SandboxError::Tls(e.to_string());
    let ca_key = rcgen::KeyPair::generate().map_err(tls_err)?;
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(tls_err)?;
    let mut dn = rcgen::DistinguishedName::new();
    // Unique like K3s's `k3s-server-ca@<time>`: a client holding another sandbox's CA then
    // sees an unknown issuer, not a signature mismatch.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    dn.push(
        rcgen::DnType::CommonName,
        format!("driftless-sandbox-server-ca@{nanos}"),
    );
    ca_params.distinguished_name = dn;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).map_err(tls_err)?;

    let mut names: Vec<String> = ["127.0.0.1", "localhost", "kubernetes", "kubernetes.default"]
        .map(String::from)
        .to_vec();
    let ip = addr.ip().to_string();
    if !addr.ip().is_unspecified() && !names.contains(&ip) {
        names.push(ip);
    }
    let mut params = rcgen::CertificateParams::new(names).map_err(tls_err)?;
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(rcgen::DnType::CommonName, "kube-apiserver");
    params.distinguished_name = dn;
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    let key = rcgen::KeyPair::generate().map_err(tls_err)?;
    let cert = params.signed_by(&key, &ca).map_err(tls_err)?;
    let der = cert.der().to_vec();
    Ok((
        ca.pem(),
        SelfSigned {
            fingerprint: tls::fingerprint(&der),
            pem: cert.pem(),
            key_der: key.serialize_der(),
            der,
        },
    ))
}

/// An admin kubeconfig in the shape of K3s's `k3s.yaml`, with a token instead of a client
/// certificate.
fn kubeconfig(url: &str, ca_pem: &str, token: &str) -> String {
    // k8s-openapi's ByteString serialises as standard base64.
    let ca_b64 = serde_json::to_value(k8s_openapi::ByteString(ca_pem.as_bytes().to_vec()))
        .ok()
        .and_then(|v| v.as_str().map(String::from))
        .unwrap_or_default();
    format!(
        "apiVersion: v1\nclusters:\n- cluster:\n    certificate-authority-data: {ca_b64}\n    server: {url}\n  \
         name: default\ncontexts:\n- context:\n    cluster: default\n    user: default\n  name: default\n\
         current-context: default\nkind: Config\npreferences: {{}}\nusers:\n- name: default\n  user:\n    \
         token: {token}\n"
    )
}

struct Shared {
    state_dir: PathBuf,
    token: String,
    seed: u64,
    started: String,
    /// When the API first saw each node: its `creationTimestamp`.
    first_seen: Mutex<BTreeMap<String, String>>,
    /// Serialises read-modify-writes of nodes and objects, and the controllers' passes.
    patch_lock: tokio::sync::Mutex<()>,
    /// The cluster CA (what `kube-root-ca.crt` holds).
    ca_pem: String,
    /// The API's URL (what `/api` names as the server address).
    url: String,
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

// ---- requests ---------------------------------------------------------------------------------

async fn entry(State(shared): State<Arc<Shared>>, req: Request) -> Response {
    let authorized = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| constant_time_eq(t.trim().as_bytes(), shared.token.as_bytes()));
    if !authorized {
        return status(401, "Unauthorized", "Unauthorized", None);
    }
    let method = req.method().as_str().to_string();
    let path = req.uri().path().to_string();
    let query = handlers::Query::parse(req.uri().query());
    let verbose = query.0.iter().any(|(k, _)| k == "verbose");
    let accept = header_text(&req, header::ACCEPT);
    let user_agent = header_text(&req, header::USER_AGENT);
    let content_type = header_text(&req, header::CONTENT_TYPE)
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let segments: Vec<String> = path.split('/').filter(|s| !s.is_empty()).map(String::from).collect();
    let segs: Vec<&str> = segments.iter().map(String::as_str).collect();
    let not_found = || {
        status(
            404,
            "NotFound",
            "the server could not find the requested resource",
            None,
        )
    };
    match (method.as_str(), segs.as_slice()) {
        ("GET", ["version"]) => return version(&shared),
        ("GET", ["livez"] | ["healthz"]) => return health("livez", &[], verbose),
        ("GET", ["readyz"]) => return readyz(&shared, verbose),
        _ => {}
    }
    let view = View::load(&shared.state_dir);
    let catalog = catalog(&shared, &view);
    match (method.as_str(), segs.as_slice()) {
        ("GET", ["api"]) => return json_response(200, &catalog.api_versions(&shared.url)),
        ("GET", ["apis"]) => return json_response(200, &catalog.group_list()),
        ("GET", ["api", "v1"]) => {
            return json_response(200, &catalog.resource_list("", "v1").unwrap_or_default());
        }
        ("GET", ["openapi", "v3"]) => return json_response(200, &openapi::index(&catalog)),
        ("GET", ["openapi", "v3", gv @ ..]) => {
            return openapi::document(&catalog, &gv.join("/")).map_or_else(not_found, |d| json_response(200, &d));
        }
        ("GET", ["apis", group]) => return catalog.group(group).map_or_else(not_found, |g| json_response(200, &g)),
        ("GET", ["apis", group, version]) => {
            return catalog
                .resource_list(group, version)
                .map_or_else(not_found, |l| json_response(200, &l));
        }
        _ => {}
    }
    let Some(target) = parse_target(&catalog, &segs) else {
        return not_found();
    };
    let res = target.res.clone();
    let ns = target.namespace.clone();
    let name = target.name.clone();
    let reads = method == "GET";
    // Nodes are the node files; pods are derived from the workloads (and stored ones).
    if res.is("", "nodes") {
        return match (method.as_str(), name.as_deref(), target.sub.as_deref()) {
            ("GET", None, None) if query.flag("watch") => {
                let shared2 = shared.clone();
                watch::stream(
                    Arc::new(move || {
                        let view = View::load(&shared2.state_dir);
                        view.nodes.iter().map(|(n, r)| node_json(&shared2, n, *r)).collect()
                    }),
                    query,
                )
            }
            ("GET", None, None) => list_nodes(&shared, &view, &catalog, &query, &accept),
            ("GET", Some(name), None | Some("status")) => get_node(&shared, &view, &catalog, name, &accept),
            ("PATCH", Some(name), None) => {
                let name = name.to_string();
                let Ok(body) = axum::body::to_bytes(req.into_body(), 1 << 20).await else {
                    return status(400, "BadRequest", "the request body could not be read", None);
                };
                patch_node(&shared, &name, &content_type, &body).await
            }
            _ => status(
                405,
                "MethodNotAllowed",
                "the server does not allow this method on the requested resource",
                None,
            ),
        };
    }
    if res.is("", "pods") && reads && target.sub.is_none() {
        let snapshot = {
            let shared = shared.clone();
            let ns = ns.clone();
            move || {
                let view = View::load(&shared.state_dir);
                all_pods(&shared, &view, ns.as_deref())
            }
        };
        if name.is_none() && query.flag("watch") {
            return watch::stream(Arc::new(snapshot), query);
        }
        let pods = snapshot();
        return match &name {
            None => match handlers::Selector::from_query(&query) {
                Ok(sel) => {
                    let items: Vec<Value> = pods.into_iter().filter(|p| sel.matches(p)).collect();
                    let rv = objects::Objects::new(&shared.state_dir).current_rv();
                    handlers::list_response(&res, items, rv, &accept, &shared)
                }
                Err(e) => status(400, "BadRequest", &e, None),
            },
            Some(n) => match pods.iter().find(|p| p["metadata"]["name"] == n.as_str()) {
                Some(p) => handlers::object_response(200, &res, p, &accept, &shared),
                None => handlers::not_found(&res, n),
            },
        };
    }
    if res.namespaced && ns.is_none() && (!reads || name.is_some()) {
        return not_found();
    }
    let body = if reads {
        Vec::new()
    } else {
        match axum::body::to_bytes(req.into_body(), 32 << 20).await {
            Ok(b) => b.to_vec(),
            Err(_) => return status(413, "RequestEntityTooLarge", "the request body is too large", None),
        }
    };
    handlers::handle(handlers::Call {
        shared: &shared,
        method: &method,
        target,
        query,
        content_type,
        accept,
        user_agent,
        body,
    })
    .await
}

fn header_text(req: &Request, h: header::HeaderName) -> String {
    req.headers()
        .get(h)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

/// Every resource served now: the built-in ones (K3s's on a K3s cluster) and the
/// Established CRDs'.
fn catalog(shared: &Shared, view: &View) -> resources::Catalog {
    let crds: Vec<Value> = objects::Objects::new(&shared.state_dir)
        .list("apiextensions.k8s.io", "customresourcedefinitions", None)
        .into_iter()
        .map(|e| e.object)
        .collect();
    resources::Catalog::new(view.is_k3s(), &crds)
}

/// `/api/v1/...` or `/apis/{group}/{version}/...`: the resource, namespace, name and
/// subresource a path names.
fn parse_target(catalog: &resources::Catalog, segs: &[&str]) -> Option<handlers::Target> {
    let (group, version, rest) = match segs {
        ["api", "v1", rest @ ..] => ("", "v1", rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return None,
    };
    let find = |plural: &str| catalog.find(group, version, plural).cloned();
    let target = |res, namespace: Option<&str>, name: Option<&str>, sub: Option<&str>| handlers::Target {
        res,
        namespace: namespace.map(String::from),
        name: name.map(String::from),
        sub: sub.map(String::from),
    };
    Some(match rest {
        ["namespaces", ns, sub @ ("status" | "finalize")] if group.is_empty() => {
            target(find("namespaces")?, None, Some(ns), Some(sub))
        }
        ["namespaces", ns, plural, tail @ ..] if tail.len() <= 2 => {
            let res = find(plural)?;
            if !res.namespaced {
                return None;
            }
            target(res, Some(ns), tail.first().copied(), tail.get(1).copied())
        }
        [plural, tail @ ..] if tail.len() <= 2 => {
            target(find(plural)?, None, tail.first().copied(), tail.get(1).copied())
        }
        _ => return None,
    })
}

/// Every pod in a namespace (or all): K3s's or Talos's kube-system components, the pods of
/// the stored workloads, and pods created through the API.
fn all_pods(shared: &Shared, view: &View, namespace: Option<&str>) -> Vec<Value> {
    let objects = objects::Objects::new(&shared.state_dir);
    let mut pods = Vec::new();
    if namespace.is_none_or(|n| n == "kube-system") {
        pods.extend(kube_system_pods(shared, view));
    }
    pods.extend(controllers::workload_pods(shared, view, &objects, namespace));
    pods.extend(objects.list("", "pods", namespace).into_iter().map(|e| e.object));
    pods.sort_by(|a, b| {
        let k = |p: &Value| {
            (
                p["metadata"]["namespace"].as_str().unwrap_or("").to_string(),
                p["metadata"]["name"].as_str().unwrap_or("").to_string(),
            )
        };
        k(a).cmp(&k(b))
    });
    pods
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn respond(code: u16, content_type: &'static str, body: Vec<u8>) -> Response {
    let mut r = Response::new(Body::from(body));
    *r.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert("x-content-type-options", HeaderValue::from_static("nosniff"));
    r
}

fn json_response(code: u16, value: &Value) -> Response {
    respond(code, "application/json", serde_json::to_vec(value).unwrap_or_default())
}

/// A `Status` object, as kube-apiserver answers errors.
fn status(code: u16, reason: &str, message: &str, details: Option<Value>) -> Response {
    let mut body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason,
    });
    if let Some(d) = details {
        body["details"] = d;
    }
    body["code"] = json!(code);
    json_response(code, &body)
}

fn not_found(name: &str) -> Response {
    status(
        404,
        "NotFound",
        &format!("nodes \"{name}\" not found"),
        Some(json!({"name": name, "kind": "nodes"})),
    )
}

/// `/livez`, `/readyz`: `ok`, or every check's line when verbose or failing (HTTP 500).
fn health(what: &str, failing: &[&str], verbose: bool) -> Response {
    const CHECKS: [&str; 8] = [
        "ping",
        "log",
        "etcd",
        "etcd-readiness",
        "informer-sync",
        "poststarthook/start-apiserver-admission-initializer",
        "poststarthook/generic-apiserver-start-informers",
        "poststarthook/rbac/bootstrap-roles",
    ];
    if failing.is_empty() && !verbose {
        return respond(200, "text/plain; charset=utf-8", b"ok".to_vec());
    }
    let mut text = String::new();
    for check in CHECKS {
        if failing.contains(&check) {
            text.push_str(&format!("[-]{check} failed: reason withheld\n"));
        } else {
            text.push_str(&format!("[+]{check} ok\n"));
        }
    }
    let (code, verdict) = if failing.is_empty() {
        (200, "passed")
    } else {
        (500, "failed")
    };
    text.push_str(&format!("{what} check {verdict}\n"));
    respond(code, "text/plain; charset=utf-8", text.into_bytes())
}

fn readyz(shared: &Shared, verbose: bool) -> Response {
    let view = View::load(&shared.state_dir);
    if view.control_plane_up() {
        health("readyz", &[], verbose)
    } else {
        health("readyz", &["etcd", "etcd-readiness"], verbose)
    }
}

fn version(shared: &Shared) -> Response {
    let view = View::load(&shared.state_dir);
    let git_version = view
        .nodes
        .iter()
        .find(|(n, _)| is_control_plane(&n.role))
        .or(view.nodes.first())
        .map(|(n, _)| n.kubelet_version.clone())
        .unwrap_or_else(|| "v1.31.4+k3s1".to_string());
    let mut parts = git_version.trim_start_matches('v').split(['.', '+', '-']);
    let major = parts.next().unwrap_or("1").to_string();
    let minor = parts.next().unwrap_or("0").to_string();
    json_response(
        200,
        &json!({
            "major": major, "minor": minor, "gitVersion": git_version, "gitTreeState": "clean",
            "goVersion": "go1.23.4", "compiler": "gc", "platform": "linux/amd64",
        }),
    )
}

// ---- nodes ------------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq)]
enum Readiness {
    Ready,
    /// The kubelet or its guest is stopped: the node controller marks it Unknown.
    Stopped,
    /// The `never-ready` knob, or no CNI: the kubelet runs and reports NotReady.
    NotReady,
}

/// Every node with its readiness, read once per request.
struct View {
    nodes: Vec<(SimNode, Readiness)>,
}

impl View {
    fn load(state_dir: &Path) -> View {
        let store = Store::discover(state_dir).ok();
        let never = cluster_state::never_ready(state_dir);
        // A cluster configured without a CNI has no pod network until a CNI add-on runs.
        let no_network = cluster_state::require_cni(state_dir)
            && cluster_state::builtin_cni(state_dir) == cluster_state::BuiltinCni::None
            && !controllers::cni_running(&objects::Objects::new(state_dir));
        let nodes = cluster_state::nodes(state_dir)
            .into_iter()
            .map(|n| {
                let r = readiness(&n, store.as_ref(), &never, no_network);
                (n, r)
            })
            .collect();
        View { nodes }
    }

    /// The API server runs: a control plane node's kubelet (and so K3s's server, or Talos's
    /// static pods) runs, Ready or not: the API server needs no pod network.
    fn control_plane_up(&self) -> bool {
        self.nodes
            .iter()
            .any(|(n, r)| is_control_plane(&n.role) && *r != Readiness::Stopped)
    }

    fn is_k3s(&self) -> bool {
        self.nodes.iter().any(|(n, _)| is_k3s(&n.role))
    }
}

fn readiness(node: &SimNode, store: Option<&Store>, never: &[String], no_network: bool) -> Readiness {
    // A guest counts as running when the sandbox's store cannot be opened.
    let guest_running = match (node.vmid, store) {
        (Some(vmid), Some(store)) => store.is_running(vmid),
        _ => true,
    };
    if !node.kubelet_running || !guest_running || node.rebooting() {
        Readiness::Stopped
    } else if no_network || never.iter().any(|n| n == &node.name) {
        Readiness::NotReady
    } else {
        Readiness::Ready
    }
}

fn is_control_plane(role: &str) -> bool {
    role == "server" || role == "controlplane"
}

fn is_k3s(role: &str) -> bool {
    role == "server" || role == "agent"
}

impl Shared {
    fn first_seen(&self, name: &str) -> String {
        let mut seen = self.first_seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.entry(name.to_string())
            .or_insert_with(|| self.started.clone())
            .clone()
    }
}

/// An opaque version that changes with the node's content and readiness.
fn resource_version(node: &SimNode, readiness: Readiness) -> String {
    let mut h = Sha256::new();
    h.update(serde_json::to_vec(node).unwrap_or_default());
    h.update([readiness as u8]);
    let d = h.finalize();
    (u64::from_be_bytes([0, 0, d[0], d[1], d[2], d[3], d[4], d[5]]) % 1_000_000_000_000).to_string()
}

fn node_json(shared: &Shared, node: &SimNode, readiness: Readiness) -> Value {
    let k3s = is_k3s(&node.role);
    let mut labels: BTreeMap<String, String> = [
        ("kubernetes.io/hostname", node.name.as_str()),
        ("kubernetes.io/os", "linux"),
        ("kubernetes.io/arch", "amd64"),
        ("beta.kubernetes.io/os", "linux"),
        ("beta.kubernetes.io/arch", "amd64"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    if k3s {
        labels.insert("node.kubernetes.io/instance-type".into(), "k3s".into());
    }
    match node.role.as_str() {
        "server" => {
            labels.insert("node-role.kubernetes.io/control-plane".into(), "true".into());
            labels.insert("node-role.kubernetes.io/master".into(), "true".into());
        }
        "controlplane" => {
            labels.insert("node-role.kubernetes.io/control-plane".into(), String::new());
        }
        _ => {}
    }
    labels.extend(node.labels.clone());
    let mut annotations: BTreeMap<String, String> = BTreeMap::from([
        ("node.alpha.kubernetes.io/ttl".to_string(), "0".to_string()),
        (
            "volumes.kubernetes.io/controller-managed-attach-detach".to_string(),
            "true".to_string(),
        ),
    ]);
    annotations.extend(node.annotations.clone());

    let created = shared.first_seen(&node.name);
    let heartbeat = now();
    let (ready_status, ready_reason, ready_message) = match readiness {
        Readiness::Ready => ("True", "KubeletReady", "kubelet is posting ready status"),
        Readiness::NotReady => (
            "False",
            "KubeletNotReady",
            "container runtime network not ready: NetworkReady=false reason:NetworkPluginNotReady \
             message:Network plugin returns error: cni plugin not initialized",
        ),
        Readiness::Stopped => ("Unknown", "NodeStatusUnknown", "Kubelet stopped posting node status."),
    };
    let conditions = json!([{
        "type": "Ready", "status": ready_status, "reason": ready_reason, "message": ready_message,
        "lastHeartbeatTime": heartbeat, "lastTransitionTime": created,
    }]);
    let mut addresses = Vec::new();
    if !node.internal_ip.is_empty() {
        addresses.push(json!({"type": "InternalIP", "address": node.internal_ip}));
    }
    addresses.push(json!({"type": "Hostname", "address": node.name}));
    let (runtime, os_image, kernel) = if k3s {
        ("containerd://1.7.23-k3s2", "Ubuntu 22.04.5 LTS", "6.8.12-4-pve")
    } else {
        ("containerd://2.0.5", "Talos", "6.12.25-talos")
    };
    let mut spec = Map::new();
    if k3s {
        spec.insert("providerID".into(), json!(format!("k3s://{}", node.name)));
    }
    if !node.taints.is_empty() {
        spec.insert("taints".into(), taints_json(&node.taints));
    }
    let id = |what: &str| store::uuid_from(shared.seed, &format!("node/{}/{what}", node.name));
    json!({
        "kind": "Node",
        "apiVersion": "v1",
        "metadata": {
            "name": node.name,
            "uid": id("uid"),
            "resourceVersion": resource_version(node, readiness),
            "creationTimestamp": created,
            "labels": labels,
            "annotations": annotations,
        },
        "spec": spec,
        "status": {
            "conditions": conditions,
            "addresses": addresses,
            "nodeInfo": {
                "machineID": id("machine").replace('-', ""),
                "systemUUID": id("system"),
                "bootID": id("boot"),
                "kernelVersion": kernel,
                "osImage": os_image,
                "containerRuntimeVersion": runtime,
                "kubeletVersion": node.kubelet_version,
                "kubeProxyVersion": node.kubelet_version,
                "operatingSystem": "linux",
                "architecture": "amd64",
            },
        },
    })
}

fn taints_json(taints: &[Taint]) -> Value {
    Value::Array(
        taints
            .iter()
            .map(|t| {
                let mut o = json!({"key": t.key, "effect": t.effect});
                if let Some(v) = &t.value {
                    o["value"] = json!(v);
                }
                o
            })
            .collect(),
    )
}

fn list_nodes(
    shared: &Shared,
    view: &View,
    catalog: &resources::Catalog,
    query: &handlers::Query,
    accept: &str,
) -> Response {
    let selector = match handlers::Selector::from_query(query) {
        Ok(s) => s,
        Err(e) => return status(400, "BadRequest", &e, None),
    };
    let items: Vec<Value> = view
        .nodes
        .iter()
        .map(|(n, r)| node_json(shared, n, *r))
        .filter(|n| selector.matches(n))
        .collect();
    let mut h = Sha256::new();
    for item in &items {
        h.update(item["metadata"]["resourceVersion"].as_str().unwrap_or("").as_bytes());
    }
    let d = h.finalize();
    let rv = u32::from_be_bytes([d[0], d[1], d[2], d[3]]);
    let res = catalog.find("", "v1", "nodes").expect("nodes are built in");
    handlers::list_response(res, items, u64::from(rv), accept, shared)
}

fn get_node(shared: &Shared, view: &View, catalog: &resources::Catalog, name: &str, accept: &str) -> Response {
    let res = catalog.find("", "v1", "nodes").expect("nodes are built in");
    match view.nodes.iter().find(|(n, _)| n.name == name) {
        Some((n, r)) => handlers::object_response(200, res, &node_json(shared, n, *r), accept, shared),
        None => not_found(name),
    }
}

/// A DNS subdomain: what a node name may be (and what keeps it a plain file name).
fn valid_node_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 253
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-' || *c == b'.')
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
}

async fn patch_node(shared: &Shared, name: &str, content_type: &str, body: &[u8]) -> Response {
    if content_type != "application/merge-patch+json" && content_type != "application/strategic-merge-patch+json" {
        return status(
            415,
            "UnsupportedMediaType",
            &format!(
                "the body of the request was in an unknown format - accepted media types include: \
                 application/merge-patch+json, application/strategic-merge-patch+json (got '{content_type}')"
            ),
            None,
        );
    }
    let patch: Value = match serde_json::from_slice(body) {
        Ok(v @ Value::Object(_)) => v,
        Ok(_) => return status(400, "BadRequest", "error decoding patch: not a JSON object", None),
        Err(e) => return status(400, "BadRequest", &format!("error decoding patch: {e}"), None),
    };
    if !valid_node_name(name) {
        return not_found(name);
    }
    let _guard = shared.patch_lock.lock().await;
    let view = View::load(&shared.state_dir);
    let Some((mut node, readiness)) = view.nodes.into_iter().find(|(n, _)| n.name == name) else {
        return not_found(name);
    };
    if let Some(rv) = patch.pointer("/metadata/resourceVersion").and_then(Value::as_str)
        && rv != resource_version(&node, readiness)
    {
        return status(
            409,
            "Conflict",
            &format!(
                "Operation cannot be fulfilled on nodes \"{name}\": the object has been modified; please apply \
                 your changes to the latest version and try again"
            ),
            Some(json!({"name": name, "kind": "nodes"})),
        );
    }
    if let Err(invalid) = apply_merge_patch(&mut node, &patch) {
        return status(
            422,
            "Invalid",
            &format!("Node \"{name}\" is invalid: {invalid}"),
            Some(
                json!({"name": name, "kind": "Node", "causes": [{"reason": "FieldValueInvalid", "message": invalid}]}),
            ),
        );
    }
    if let Err(e) = cluster_state::write_node(&shared.state_dir, &node) {
        return status(
            500,
            "InternalError",
            &format!("cannot store node \"{name}\": {e}"),
            None,
        );
    }
    json_response(200, &node_json(shared, &node, readiness))
}

/// RFC 7386 on the parts of a node the sandbox stores: `metadata.labels`,
/// `metadata.annotations` (`null` removes a key, or the whole map) and `spec.taints`
/// (replaced). The error is kube-apiserver's `field: what` text.
fn apply_merge_patch(node: &mut SimNode, patch: &Value) -> Result<(), String> {
    for (key, value) in patch.as_object().into_iter().flatten() {
        match (key.as_str(), value) {
            ("apiVersion", _) | ("kind", _) => {}
            ("metadata", Value::Object(meta)) => {
                for (field, v) in meta {
                    match field.as_str() {
                        "labels" => merge_map(&mut node.labels, v, "metadata.labels", true)?,
                        "annotations" => merge_map(&mut node.annotations, v, "metadata.annotations", false)?,
                        "resourceVersion" => {}
                        "name" if v.as_str() == Some(node.name.as_str()) => {}
                        other => return Err(not_simulated(&format!("metadata.{other}"))),
                    }
                }
            }
            ("spec", Value::Object(spec)) => {
                for (field, v) in spec {
                    match field.as_str() {
                        "taints" => node.taints = parse_taints(v)?,
                        other => return Err(not_simulated(&format!("spec.{other}"))),
                    }
                }
            }
            (other, _) => return Err(not_simulated(other)),
        }
    }
    Ok(())
}

fn not_simulated(field: &str) -> String {
    format!(
        "{field}: Forbidden: the driftless sandbox stores only metadata.labels, metadata.annotations and spec.taints"
    )
}

fn merge_map(map: &mut BTreeMap<String, String>, patch: &Value, path: &str, label: bool) -> Result<(), String> {
    let entries = match patch {
        Value::Null => {
            map.clear();
            return Ok(());
        }
        Value::Object(o) => o,
        _ => return Err(format!("{path}: Invalid value: must be an object")),
    };
    for (k, v) in entries {
        if !valid_qualified_name(k) {
            return Err(format!(
                "{path}: Invalid value: \"{k}\": name part must consist of alphanumeric characters, '-', '_' or \
                 '.', and must start and end with an alphanumeric character, with an optional DNS subdomain prefix \
                 and '/'"
            ));
        }
        match v {
            Value::Null => {
                map.remove(k);
            }
            Value::String(s) => {
                if label && !valid_label_value(s) {
                    return Err(format!(
                        "{path}: Invalid value: \"{s}\": a valid label must be an empty string or consist of \
                         alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric \
                         character (at most 63 characters)"
                    ));
                }
                map.insert(k.clone(), s.clone());
            }
            _ => return Err(format!("{path}[{k}]: Invalid value: must be a string")),
        }
    }
    Ok(())
}

fn parse_taints(v: &Value) -> Result<Vec<Taint>, String> {
    const EFFECTS: [&str; 3] = ["NoSchedule", "PreferNoSchedule", "NoExecute"];
    let items = match v {
        Value::Null => return Ok(Vec::new()),
        Value::Array(a) => a,
        _ => return Err("spec.taints: Invalid value: must be a list".into()),
    };
    let mut taints: Vec<Taint> = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let field = |f: &str| item.get(f).and_then(Value::as_str).map(String::from);
        let key = field("key").unwrap_or_default();
        if !valid_qualified_name(&key) {
            return Err(format!(
                "spec.taints[{i}].key: Invalid value: \"{key}\": must be a qualified name"
            ));
        }
        let value = field("value").filter(|v| !v.is_empty());
        if let Some(v) = &value
            && !valid_label_value(v)
        {
            return Err(format!(
                "spec.taints[{i}].value: Invalid value: \"{v}\": must be a valid label value"
            ));
        }
        let effect = field("effect").unwrap_or_default();
        if !EFFECTS.contains(&effect.as_str()) {
            return Err(format!(
                "spec.taints[{i}].effect: Unsupported value: \"{effect}\": supported values: \"NoSchedule\", \
                 \"PreferNoSchedule\", \"NoExecute\""
            ));
        }
        if taints.iter().any(|t| t.key == key && t.effect == effect) {
            return Err(format!(
                "spec.taints[{i}]: Duplicate value: taints must be unique by key and effect pair"
            ));
        }
        taints.push(Taint { key, value, effect });
    }
    Ok(taints)
}

/// `[prefix/]name`: a DNS subdomain prefix and a name of at most 63 characters.
fn valid_qualified_name(s: &str) -> bool {
    let (prefix, name) = match s.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, s),
    };
    prefix.is_none_or(valid_node_name) && !name.is_empty() && valid_label_value(name)
}

fn valid_label_value(s: &str) -> bool {
    let b = s.as_bytes();
    b.is_empty()
        || b.len() <= 63
            && b.iter().all(|c| c.is_ascii_alphanumeric() || b"-_.".contains(c))
            && b[0].is_ascii_alphanumeric()
            && b[b.len() - 1].is_ascii_alphanumeric()
}

// ---- pods -------------------------------------------------------------------------------------

/// What K3s deploys from its packaged manifests, or what Talos runs before a CNI or
/// workloads: CoreDNS and one kube-apiserver static pod per control plane node.
fn kube_system_pods(shared: &Shared, view: &View) -> Vec<Value> {
    if view.nodes.is_empty() {
        return Vec::new();
    }
    let ready_cp = view
        .nodes
        .iter()
        .find(|(n, r)| is_control_plane(&n.role) && *r == Readiness::Ready)
        .map(|(n, _)| n);
    let placement = match ready_cp {
        Some(node) => Placement::Running(node),
        None => Placement::Unschedulable(view.nodes.len()),
    };
    let mut pods = Vec::new();
    let mut deployment = |app: &str, image: &str, replicas: usize| {
        let template = pod_suffix(shared.seed, app, 10);
        for i in 0..replicas {
            let name = format!("{app}-{template}-{}", pod_suffix(shared.seed, &format!("{app}/{i}"), 5));
            pods.push(pod_json(shared, &name, app, image, placement));
        }
    };
    if view.is_k3s() {
        deployment("coredns", "rancher/mirrored-coredns-coredns:1.12.0", 1);
        deployment("local-path-provisioner", "rancher/local-path-provisioner:v0.0.30", 1);
        deployment("metrics-server", "rancher/mirrored-metrics-server:v0.7.2", 1);
        deployment("traefik", "rancher/mirrored-library-traefik:3.3.2", 1);
    } else {
        deployment("coredns", "registry.k8s.io/coredns/coredns:v1.12.1", 2);
        for (node, readiness) in view.nodes.iter().filter(|(n, _)| is_control_plane(&n.role)) {
            let image = format!("registry.k8s.io/kube-apiserver:{}", node.kubelet_version);
            // A static pod is bound to its node and runs while its kubelet runs (on the
            // host's network: no CNI needed).
            let placement = match readiness {
                Readiness::Stopped => Placement::Creating(node),
                _ => Placement::Running(node),
            };
            pods.push(pod_json(
                shared,
                &format!("kube-apiserver-{}", node.name),
                "kube-apiserver",
                &image,
                placement,
            ));
        }
    }
    pods
}

#[derive(Clone, Copy)]
enum Placement<'a> {
    /// Running and ready on this node.
    Running(&'a SimNode),
    /// Bound to this node, its container not started.
    Creating(&'a SimNode),
    /// Pending: none of this many nodes can take it.
    Unschedulable(usize),
}

/// Characters Kubernetes uses in generated names.
fn pod_suffix(seed: u64, what: &str, len: usize) -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut h = Sha256::new();
    h.update(seed.to_le_bytes());
    h.update(what.as_bytes());
    h.finalize()
        .iter()
        .take(len)
        .map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char)
        .collect()
}

fn pod_json(shared: &Shared, name: &str, app: &str, image: &str, placement: Placement<'_>) -> Value {
    let created = shared.started.clone();
    let container = app.split('-').next().unwrap_or(app);
    let (status, node) = match placement {
        Placement::Running(node) => (
            json!({
                "phase": "Running",
                "conditions": [
                    {"type": "PodScheduled", "status": "True"},
                    {"type": "Initialized", "status": "True"},
                    {"type": "ContainersReady", "status": "True"},
                    {"type": "Ready", "status": "True"},
                ],
                "hostIP": node.internal_ip,
                "startTime": created,
                "containerStatuses": [{
                    "name": container, "image": image, "imageID": "", "ready": true, "started": true,
                    "restartCount": 0, "state": {"running": {"startedAt": created}},
                }],
            }),
            Some(node),
        ),
        Placement::Creating(node) => (
            json!({
                "phase": "Pending",
                "conditions": [{"type": "PodScheduled", "status": "True"}],
                "containerStatuses": [{
                    "name": container, "image": image, "imageID": "", "ready": false, "started": false,
                    "restartCount": 0, "state": {"waiting": {"reason": "ContainerCreating"}},
                }],
            }),
            Some(node),
        ),
        Placement::Unschedulable(n) => (
            json!({
                "phase": "Pending",
                "conditions": [{
                    "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                    "message": format!(
                        "0/{n} nodes are available: {n} node(s) had untolerated taint {{node.kubernetes.io/not-ready: }}."
                    ),
                }],
            }),
            None,
        ),
    };
    let mut spec = json!({"containers": [{"name": container, "image": image}]});
    if let Some(node) = node {
        spec["nodeName"] = json!(node.name);
    }
    json!({
        "kind": "Pod",
        "apiVersion": "v1",
        "metadata": {
            "name": name,
            "namespace": "kube-system",
            "uid": store::uuid_from(shared.seed, &format!("pod/{name}")),
            "creationTimestamp": created,
            "labels": {"k8s-app": app},
        },
        "spec": spec,
        "status": status,
    })
}
