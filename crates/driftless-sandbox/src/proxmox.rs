//! The sandbox's Proxmox VE API server.
//!
//! What is mimicked, and from where:
//! * pve-http-server (`PVE::APIServer::AnyEvent`, `Formatter::Standard`) and pve-manager
//!   (`PVE::HTTPServer`): only GET/POST/PUT/DELETE (else 501 "method 'X' not available");
//!   authentication before routing; an authentication failure is HTTP 401 with the error as
//!   the status line's reason (`No ticket`, `invalid token value!`, `no such token ...`) and an
//!   empty body (real Proxmox also delays it by 3 s: the sandbox does not); an unknown path is
//!   501 "Method 'GET /foo' not implemented"; errors come as `{"data":null,"message":"..."}`
//!   (plus `"errors":{...}` for HTTP 400) with the message's first line as the reason phrase;
//!   form (or JSON) bodies up to 64 KiB; a body parameter contradicting the path is 400
//!   "duplicate parameter (already defined in URI) with conflicting values!".
//! * pve-access-control `verify_token`: `Authorization: PVEAPIToken=USER@REALM!TOKENID=SECRET`;
//!   the caller is the token (`root@pam!driftless`), never `root@pam`, so the root-only checks
//!   of pve-container apply (features other than nesting, privileged containers' features,
//!   device passthrough, hookscripts, bind mounts).
//! * Parameters are validated with the official schema ([`ApiSchema`]) before the handler
//!   runs: HTTP 400 "Parameter verification failed." with the per-parameter errors.
//! * Handlers follow pve-container / qemu-server: which errors are synchronous (HTTP 500, e.g.
//!   "CT 100 already exists on node 'pve'", "unable to destroy CT 100 - container is running",
//!   "CT 100 already running", the digest mismatch) and which happen inside a task (the UPID's
//!   exit status). Tasks take a few milliseconds plus the latency knob.
//!
//! * Privileges (`access`): the schema's `permissions.check` of each endpoint before its
//!   parameters are validated, then the handlers' own checks (pve-container
//!   `check_ct_modify_config_perm`, qemu-server `check_vm_modify_config_perm`, storage and
//!   bridge access, `Sys.Modify` for privileged containers), each refusal an HTTP 403
//!   "Permission check failed (PATH, PRIVILEGE)"; listings show only what the caller may audit.
//!   Without an ACL in the options, every token may do everything (root's token without
//!   privilege separation).
//! * Read-only views for `driftless doctor`: `GET /access/permissions`, `/nodes/{node}/network`
//!   (a NIC and the configured bridges), `/nodes/{node}/storage` (`local` and `local-lvm`
//!   with their sizes), `.../storage/{storage}/status` and `.../content` (the files of `local`,
//!   the guest disks of `local-lvm`).
//!
//! Simpler than Proxmox: tokens only (no tickets, CSRF), no groups or pools in ACLs, no HA,
//! snapshots, backups/restore, firewall; two storages per node, `local` holding
//! templates/ISOs/backups and `local-lvm` disks (any other id is taken to hold disks, and a
//! template need not exist to create from it); the OS type comes from the template's file
//! name; QEMU options outside qemu-server's privilege classes are not refused to tokens
//! (only `args`, `lock`, `hookscript`); task logs are not kept. Task records (UPID and exit
//! status) are saved at shutdown and read back by the next start on the same state, as
//! Proxmox's task index survives a restart of its API: a client polling a task across the
//! restart finds it.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Response;
use serde_json::{Map, Value, json};

use crate::access::{Acl, Perms};
use crate::guest::{self, ApiError, Changes, type_str};
use crate::store::{self, Loaded, Store};
use crate::tls::SelfSigned;
use crate::{Knobs, SandboxError};
use driftless::pve::api_schema::{ApiSchema, json_params_to_strings};
use driftless::pve::conf::{GuestConf, PveKind};

/// Proxmox's limit on a form body (`$limit_max_post`).
const MAX_POST: usize = 64 * 1024;
/// How long a task runs at least, on top of the latency knob and its task-duration knob.
const TASK_TIME: Duration = Duration::from_millis(3);
/// The simulated host.
const NODE_CPUS: u64 = 8;
const NODE_MEM: u64 = 32 << 30;

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One accepted API token.
pub(crate) struct Token {
    user: String,
    token: String,
    secret: String,
}

/// The accepted API tokens.
pub(crate) struct TokenAuth {
    tokens: Vec<Token>,
}

impl TokenAuth {
    #[cfg(test)]
    pub fn parse(full: &str) -> Result<TokenAuth, String> {
        TokenAuth::parse_all(&[full])
    }

    pub fn parse_all(list: &[&str]) -> Result<TokenAuth, String> {
        let bad = || "token must look like USER@REALM!TOKENID=SECRET".to_string();
        let mut tokens = Vec::new();
        for full in list {
            let (id, secret) = full.split_once('=').ok_or_else(bad)?;
            let (user, token) = split_tokenid(id).ok_or_else(bad)?;
            if secret.is_empty() {
                return Err(bad());
            }
            tokens.push(Token {
                user,
                token,
                secret: secret.to_string(),
            });
        }
        Ok(TokenAuth { tokens })
    }

    /// pve-manager `auth_handler` + pve-access-control `verify_token`: the caller's auth id,
    /// or the message Proxmox puts in the 401 status line. The secret is never echoed.
    fn verify(&self, headers: &HeaderMap) -> Result<String, String> {
        let get = |h: header::HeaderName| headers.get(h).and_then(|v| v.to_str().ok());
        let authorization = get(header::AUTHORIZATION);
        let ticket = extract_auth_value(get(header::COOKIE), "PVEAuthCookie")
            .or_else(|| extract_auth_value(authorization, "PVEAuthCookie"));
        if ticket.is_some() {
            return Err("permission denied - invalid PVE ticket".into());
        }
        let Some(api_token) = extract_auth_value(authorization, "PVEAPIToken") else {
            return Err("No ticket".into());
        };
        let Some((tokenid, value)) = api_token.rsplit_once('=') else {
            return Err("no tokenid specified".into());
        };
        let Some((user, token)) = split_tokenid(tokenid) else {
            return Err(format!("'{tokenid}' is not a valid token ID"));
        };
        if !self.tokens.iter().any(|t| t.user == user) {
            return Err(format!("no such user ('{user}')"));
        }
        let Some(t) = self.tokens.iter().find(|t| t.user == user && t.token == token) else {
            return Err(format!("no such token '{token}' for user '{user}'"));
        };
        if value != t.secret {
            return Err("invalid token value!".into());
        }
        Ok(tokenid.to_string())
    }
}

/// `USER@REALM!TOKEN` into (`USER@REALM`, `TOKEN`).
fn split_tokenid(id: &str) -> Option<(String, String)> {
    let (user, token) = id.split_once('!')?;
    let (name, realm) = user.rsplit_once('@')?;
    let ident = |s: &str| {
        s.len() >= 2
            && s.as_bytes()[0].is_ascii_alphabetic()
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    };
    let name_ok = !name.is_empty() && !name.contains(|c: char| c.is_whitespace() || c == ':' || c == '/');
    (name_ok && ident(realm) && ident(token)).then(|| (user.to_string(), token.to_string()))
}

/// `PVE::APIServer::Formatter::extract_auth_value`.
fn extract_auth_value(header: Option<&str>, key: &str) -> Option<String> {
    let header = header?;
    let mut from = 0;
    while let Some(pos) = header[from..].find(key) {
        let start = from + pos;
        let before_ok = start == 0 || header[..start].ends_with(char::is_whitespace);
        let after = &header[start + key.len()..];
        if before_ok && (after.starts_with('=') || after.starts_with(' ')) {
            let value = after[1..].split(';').next().unwrap_or("");
            return (!value.is_empty()).then(|| percent_decode(value));
        }
        from = start + key.len();
    }
    None
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let hex = |i: usize| b.get(i).and_then(|c| (*c as char).to_digit(16));
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && let (Some(h), Some(l)) = (hex(i + 1), hex(i + 2))
        {
            out.push((h * 16 + l) as u8);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// pve-http-server `decode_urlencoded`: `&` or `;` separated, `+` is a space, repeated keys
/// joined with NUL.
fn decode_urlencoded(data: &str) -> BTreeMap<String, String> {
    let mut out: BTreeMap<String, String> = BTreeMap::new();
    for kv in data.split(['&', ';']).filter(|kv| !kv.is_empty()) {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        let k = percent_decode(&k.replace('+', " "));
        let v = percent_decode(&v.replace('+', " "));
        out.entry(k)
            .and_modify(|old| {
                old.push('\0');
                old.push_str(&v);
            })
            .or_insert(v);
    }
    out
}

#[derive(serde::Serialize, serde::Deserialize)]
struct TaskRecord {
    node: String,
    pid: u32,
    pstart: u32,
    starttime: u64,
    kind: String,
    id: String,
    user: String,
    exit: Option<String>,
}

pub(crate) struct Shared {
    store: Store,
    /// Serialises the sandbox's own reads-modify-writes (Proxmox's config lock).
    io: Mutex<()>,
    knobs: Arc<Knobs>,
    auth: TokenAuth,
    acl: Option<Acl>,
    bridges: Vec<String>,
    tasks: Mutex<HashMap<String, TaskRecord>>,
    workers: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// VMs being created (their config appears when the task ends).
    creating: Mutex<BTreeMap<u32, String>>,
    next_pid: AtomicU32,
    pstart: u32,
    seed: u64,
    fingerprint: String,
    started: u64,
}

pub(crate) struct ServeArgs {
    pub listener: std::net::TcpListener,
    pub cert: Option<SelfSigned>,
    pub store: Store,
    pub knobs: Arc<Knobs>,
    pub auth: TokenAuth,
    pub acl: Option<Acl>,
    pub bridges: Vec<String>,
    pub seed: u64,
    pub fingerprint: String,
}

pub(crate) struct Server {
    handle: axum_server::Handle<SocketAddr>,
    join: tokio::task::JoinHandle<()>,
    shared: Arc<Shared>,
}

impl Server {
    pub async fn shutdown(self) {
        self.handle.graceful_shutdown(Some(Duration::from_secs(2)));
        let _ = self.join.await;
        loop {
            let workers = std::mem::take(&mut *lock(&self.shared.workers));
            if workers.is_empty() {
                break;
            }
            for w in workers {
                let _ = w.await;
            }
        }
        let path = tasks_path(&self.shared.store.root);
        if let Ok(json) = serde_json::to_vec(&*lock(&self.shared.tasks)) {
            let _ = store::atomic_write(&path, &json);
        }
    }
}

fn tasks_path(root: &std::path::Path) -> std::path::PathBuf {
    root.join(".sandbox").join("tasks.json")
}

/// The tasks an earlier start on this state saved at its shutdown.
fn load_tasks(root: &std::path::Path) -> HashMap<String, TaskRecord> {
    std::fs::read(tasks_path(root))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

pub(crate) fn serve(args: ServeArgs) -> Result<Server, SandboxError> {
    let seed = args.seed;
    let tasks = load_tasks(&args.store.root);
    // Past the pids of the tasks read back, so no UPID is handed out twice.
    let first_pid = tasks
        .values()
        .map(|t| t.pid + 1)
        .max()
        .unwrap_or(0)
        .max(0x1000 + (store::splitmix64(seed) % 0x8000) as u32);
    let shared = Arc::new(Shared {
        store: args.store,
        io: Mutex::new(()),
        knobs: args.knobs,
        auth: args.auth,
        acl: args.acl,
        bridges: args.bridges,
        tasks: Mutex::new(tasks),
        workers: Mutex::new(Vec::new()),
        creating: Mutex::new(BTreeMap::new()),
        next_pid: AtomicU32::new(first_pid),
        pstart: 0x100000 + (store::splitmix64(seed ^ 1) % 0x100000) as u32,
        seed,
        fingerprint: args.fingerprint,
        started: now(),
    });
    let app = axum::Router::new().fallback(entry).with_state(shared.clone());
    let handle = axum_server::Handle::new();
    let bind_err = |source| SandboxError::Bind {
        addr: args
            .listener
            .local_addr()
            .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 0))),
        source,
    };
    let join = match args.cert {
        Some(cert) => {
            let config = axum_server::tls_rustls::RustlsConfig::from_config(cert.server_config()?);
            let listener = args.listener.try_clone().map_err(bind_err)?;
            let server = axum_server::tls_rustls::from_tcp_rustls(listener, config)
                .map_err(bind_err)?
                .http1_only()
                .handle(handle.clone());
            tokio::spawn(async move {
                if let Err(e) = server.serve(app.into_make_service()).await {
                    tracing::warn!("sandbox server stopped: {e}");
                }
            })
        }
        None => {
            let listener = args.listener.try_clone().map_err(bind_err)?;
            let server = axum_server::from_tcp(listener)
                .map_err(bind_err)?
                .http1_only()
                .handle(handle.clone());
            tokio::spawn(async move {
                if let Err(e) = server.serve(app.into_make_service()).await {
                    tracing::warn!("sandbox server stopped: {e}");
                }
            })
        }
    };
    Ok(Server { handle, join, shared })
}

// ---- responses --------------------------------------------------------------------------------

fn respond(status: u16, reason: &str, body: Option<Value>) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut builder = Response::builder()
        .status(status)
        .header(header::SERVER, "pve-api-daemon/3.0")
        .header(header::CACHE_CONTROL, "max-age=0")
        .header(header::PRAGMA, "no-cache");
    let body = match body {
        Some(v) => {
            builder = builder.header(header::CONTENT_TYPE, "application/json;charset=UTF-8");
            Body::from(serde_json::to_vec(&v).unwrap_or_default())
        }
        None => Body::empty(),
    };
    let mut resp = builder.body(body).unwrap_or_default();
    let reason: String = reason
        .lines()
        .next()
        .unwrap_or("")
        .chars()
        .map(|c| if c == '\t' || (' '..='~').contains(&c) { c } else { '?' })
        .collect();
    if !reason.is_empty()
        && let Ok(phrase) = hyper::ext::ReasonPhrase::try_from(reason)
    {
        resp.extensions_mut().insert(phrase);
    }
    resp
}

fn ok(data: Value) -> Response {
    respond(200, "OK", Some(json!({ "data": data })))
}

fn error_response(e: &ApiError) -> Response {
    let mut body = Map::new();
    body.insert("data".into(), Value::Null);
    body.insert("message".into(), Value::String(e.message.clone()));
    if !e.errors.is_empty() {
        let errors: Map<String, Value> = e
            .errors
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        body.insert("errors".into(), Value::Object(errors));
    }
    respond(e.status, e.first_line(), Some(Value::Object(body)))
}

// ---- entry point -----------------------------------------------------------------------------

async fn entry(State(sh): State<Arc<Shared>>, req: Request) -> Response {
    let method = req.method().as_str().to_string();
    let path = req.uri().path().to_string();
    let query = req.uri().query().map(str::to_string);
    let headers = req.headers().clone();

    let latency = sh.knobs.latency();
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    if !matches!(method.as_str(), "GET" | "POST" | "PUT" | "DELETE") {
        sh.knobs.count(format!("{method} {path}"));
        return respond(501, &format!("method '{method}' not available"), None);
    }
    let Some(rel) = path
        .strip_prefix("/api2/json")
        .filter(|r| r.is_empty() || r.starts_with('/'))
    else {
        sh.knobs.count(format!("{method} {path}"));
        return respond(501, "no such uri", None);
    };
    let rel = if rel.is_empty() {
        "/".to_string()
    } else {
        rel.to_string()
    };

    let authid = match sh.auth.verify(&headers) {
        Ok(id) => id,
        Err(msg) => {
            sh.knobs.count(format!("{method} {rel}"));
            tracing::debug!(%method, path = %rel, "sandbox: authentication failure: {msg}");
            return respond(401, &msg, None);
        }
    };

    let body = match axum::body::to_bytes(req.into_body(), MAX_POST + 1).await {
        Ok(b) => b,
        Err(_) => return respond(501, "for data too large", None),
    };
    let schema = ApiSchema::embedded();
    let found = schema.find(&method, &rel);
    sh.knobs.count(match &found {
        Some((ep, _)) => format!("{method} {}", ep.path),
        None => format!("{method} {rel}"),
    });
    if body.len() > MAX_POST {
        return respond(501, "for data too large", None);
    }
    if !body.is_empty() && !matches!(method.as_str(), "POST" | "PUT") {
        return respond(501, &format!("Unexpected content for method '{method}'"), None);
    }
    if sh.knobs.should_fail() {
        return error_response(&ApiError::die("sandbox: injected failure (error_rate)"));
    }
    let Some((endpoint, path_params)) = found else {
        let decoded = percent_decode(&rel);
        return error_response(&ApiError::status(
            501,
            format!("Method '{method} {decoded}' not implemented"),
        ));
    };

    let mut params: BTreeMap<String, String> = BTreeMap::new();
    if !body.is_empty() {
        let is_json = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct.starts_with("application/json"));
        if is_json {
            match serde_json::from_slice::<Value>(&body) {
                Ok(Value::Object(map)) => params = json_params_to_strings(&map),
                _ => {
                    return error_response(&ApiError::die("malformed JSON body"));
                }
            }
        } else {
            params = decode_urlencoded(&String::from_utf8_lossy(&body));
        }
    }
    if let Some(q) = &query {
        params.extend(decode_urlencoded(q));
    }
    params.remove("_dc");
    for (k, v) in &path_params {
        if params.get(k).is_some_and(|p| p != v) {
            return error_response(&ApiError::param(
                k,
                "duplicate parameter (already defined in URI) with conflicting values!",
            ));
        }
        params.insert(k.clone(), v.clone());
    }
    // pve-http-server checks the schema's `permissions` before the handler validates the
    // parameters: a caller without the privilege learns nothing about its parameters.
    if let Some(check) = schema_permission_check(&method, &endpoint.path)
        && let Err(e) = sh.perms(&authid).check_schema(check, &params)
    {
        return error_response(&e);
    }
    if let Err(e) = schema.validate(endpoint, &params) {
        return error_response(&ApiError::params(e));
    }
    let r = Req {
        method,
        template: endpoint.path.clone(),
        params,
        authid,
    };
    match sh.dispatch(&r) {
        Ok(data) => ok(data),
        Err(e) => error_response(&e),
    }
}

/// The `permissions.check` of an endpoint in the embedded API schema subset.
fn schema_permission_check(method: &str, path: &str) -> Option<&'static Value> {
    static CHECKS: std::sync::OnceLock<HashMap<(String, String), Value>> = std::sync::OnceLock::new();
    CHECKS
        .get_or_init(|| {
            let subset: Value =
                serde_json::from_str(driftless::pve::api_schema::SUBSET_JSON).expect("the embedded subset is JSON");
            subset
                .get("endpoints")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|e| {
                    let check = e.get("permissions")?.get("check")?.clone();
                    Some((
                        (
                            e.get("method")?.as_str()?.to_string(),
                            e.get("path")?.as_str()?.to_string(),
                        ),
                        check,
                    ))
                })
                .collect()
        })
        .get(&(method.to_string(), path.to_string()))
}

/// Storages are listed to callers with `Datastore.Audit` or `Datastore.AllocateSpace` on them.
fn storage_visible(perms: &Perms, storage: &str) -> bool {
    let path = format!("/storage/{storage}");
    perms.has(&path, "Datastore.Audit") || perms.has(&path, "Datastore.AllocateSpace")
}

struct Req {
    method: String,
    template: String,
    params: BTreeMap<String, String>,
    authid: String,
}

impl Req {
    fn p(&self, key: &str) -> Option<&str> {
        self.params.get(key).map(String::as_str)
    }

    fn node(&self) -> &str {
        self.p("node").unwrap_or("")
    }

    fn vmid(&self) -> u32 {
        self.p("vmid").and_then(|v| v.parse().ok()).unwrap_or(0)
    }

    fn kind(&self) -> PveKind {
        if self.template.starts_with("/nodes/{node}/lxc") {
            PveKind::Lxc
        } else {
            PveKind::Qemu
        }
    }

    fn flag(&self, key: &str) -> bool {
        self.p(key) == Some("1")
    }
}

fn config_missing(node: &str, kind: PveKind, vmid: u32) -> ApiError {
    ApiError::die(format!(
        "Configuration file '{}' does not exist",
        Store::cfs_path(node, kind, vmid)
    ))
}

fn check_lock(kind: PveKind, conf: &GuestConf) -> Result<(), ApiError> {
    match conf.options.get("lock") {
        Some(l) => Err(ApiError::die(format!("{} is locked ({l})", type_str(kind)))),
        None => Ok(()),
    }
}

fn num_opt(conf: &GuestConf, key: &str) -> Option<u64> {
    conf.options.get(key).and_then(|v| v.parse().ok())
}

impl Shared {
    fn dispatch(self: &Arc<Self>, r: &Req) -> Result<Value, ApiError> {
        if let Some(node) = r.p("node")
            && !self.store.has_node(node)
        {
            return Err(ApiError::die(format!(
                "hostname lookup '{node}' failed - failed to get address info for: {node}: Name or service not known"
            )));
        }
        if let Some(node) = r.p("node")
            && self.knobs.node_offline(node)
        {
            // pveproxy forwards the request to the node, which does not answer.
            return Err(ApiError::status(595, format!("No route to host ({node})\n")));
        }
        let action = r.template.rsplit('/').next().unwrap_or("");
        match (r.method.as_str(), r.template.as_str()) {
            ("GET", "/version") => Ok(json!({"version": "9.1.3", "release": "9.1", "repoid": "5d3f1a2b4c6e7f80"})),
            ("GET", "/nodes") => Ok(self.nodes_index()),
            ("GET", "/access/permissions") => self.access_permissions(r),
            ("GET", "/nodes/{node}/network") => Ok(self.network(r.p("type"))),
            ("GET", "/nodes/{node}/storage") => Ok(self.storage_index(r)),
            ("GET", "/nodes/{node}/storage/{storage}/status") => self.storage_status(r),
            ("GET", "/nodes/{node}/storage/{storage}/content") => self.storage_content(r),
            ("GET", "/cluster/resources") => Ok(self.resources(r.p("type"), &self.perms(&r.authid))),
            ("GET", "/nodes/{node}/tasks/{upid}/status") => self.task_status(r),
            ("GET", "/nodes/{node}/lxc" | "/nodes/{node}/qemu") => {
                Ok(self.vmlist(r.node(), r.kind(), &self.perms(&r.authid)))
            }
            ("POST", "/nodes/{node}/lxc") => self.lxc_create(r),
            ("POST", "/nodes/{node}/qemu") => self.qemu_create(r),
            ("DELETE", _) => self.destroy(r),
            ("GET", t) if t.ends_with("/config") => self.get_config(r),
            ("PUT", t) if t.ends_with("/config") => self.update_config(r, true),
            ("POST", "/nodes/{node}/qemu/{vmid}/config") => self.update_config(r, false),
            ("GET", t) if t.ends_with("/pending") => self.pending(r),
            ("GET", t) if t.ends_with("/status/current") => self.status_current(r),
            ("POST", t) if t.contains("/status/") => self.power(r, action),
            _ => Err(ApiError::status(
                501,
                format!("Method '{} {}' not implemented", r.method, r.template),
            )),
        }
    }

    fn io(&self) -> MutexGuard<'_, ()> {
        lock(&self.io)
    }

    /// What the caller may do.
    fn perms<'a>(&'a self, authid: &'a str) -> Perms<'a> {
        Perms {
            authid,
            acl: self.acl.as_ref(),
        }
    }

    fn load(&self, node: &str, kind: PveKind, vmid: u32) -> Result<Loaded, ApiError> {
        self.store
            .load(node, kind, vmid)?
            .ok_or_else(|| config_missing(node, kind, vmid))
    }

    /// `PVE::Cluster::check_vmid_unused`.
    fn check_vmid_unused(&self, vmid: u32) -> Result<(), ApiError> {
        let existing = self
            .store
            .find(vmid)
            .or_else(|| lock(&self.creating).get(&vmid).map(|n| (n.clone(), PveKind::Qemu)));
        match existing {
            Some((node, kind)) => Err(ApiError::die(format!(
                "{} {vmid} already exists on node '{node}'",
                type_str(kind)
            ))),
            None => Ok(()),
        }
    }

    /// Run `effect` as a Proxmox task: answers its UPID now, runs after a short delay.
    fn spawn_task<F>(self: &Arc<Self>, node: &str, kind: &str, id: String, authid: &str, effect: F) -> String
    where
        F: FnOnce(&Shared) -> Result<(), ApiError> + Send + 'static,
    {
        let pid = self.next_pid.fetch_add(1, Ordering::Relaxed);
        let starttime = now();
        let upid = format!(
            "UPID:{node}:{pid:08X}:{:08X}:{starttime:08X}:{kind}:{id}:{authid}:",
            self.pstart
        );
        lock(&self.tasks).insert(
            upid.clone(),
            TaskRecord {
                node: node.to_string(),
                pid,
                pstart: self.pstart,
                starttime,
                kind: kind.to_string(),
                id,
                user: authid.to_string(),
                exit: None,
            },
        );
        let sh = self.clone();
        let key = upid.clone();
        let delay = TASK_TIME + self.knobs.task_duration(kind);
        self.knobs.task_started();
        let worker = tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let result = {
                let _io = sh.io();
                effect(&sh)
            };
            sh.knobs.task_ended();
            let exit = match result {
                Ok(()) => "OK".to_string(),
                Err(e) => e.first_line().to_string(),
            };
            if let Some(t) = lock(&sh.tasks).get_mut(&key) {
                t.exit = Some(exit);
            }
        });
        let mut workers = lock(&self.workers);
        workers.retain(|w| !w.is_finished());
        workers.push(worker);
        upid
    }

    // ---- cluster and node views ------------------------------------------------------------

    fn nodes_index(&self) -> Value {
        let uptime = now().saturating_sub(self.started) + 86_400;
        let items: Vec<Value> = self
            .store
            .nodes
            .iter()
            .map(|n| {
                let status = if self.knobs.node_offline(n) {
                    "offline"
                } else {
                    "online"
                };
                json!({
                    "node": n, "status": status, "type": "node", "id": format!("node/{n}"),
                    "cpu": 0.02, "maxcpu": NODE_CPUS, "mem": 4u64 << 30, "maxmem": NODE_MEM,
                    "disk": 8u64 << 30, "maxdisk": 100u64 << 30, "uptime": uptime, "level": "",
                    "ssl_fingerprint": self.fingerprint,
                })
            })
            .collect();
        Value::Array(items)
    }

    /// `GET /access/permissions` (pve-access-control `API2::AccessControl::permissions`).
    fn access_permissions(&self, r: &Req) -> Result<Value, ApiError> {
        let caller = r.authid.as_str();
        let userid = r.p("userid").unwrap_or(caller);
        let owned_token = userid.split_once('!').is_some_and(|(u, _)| u == caller);
        if userid != caller && !owned_token {
            self.perms(caller).check("/access", &["Sys.Audit"])?;
        }
        let everything =
            || -> BTreeMap<String, bool> { crate::access::all_privileges().into_iter().map(|p| (p, true)).collect() };
        let to_json = |privs: BTreeMap<String, bool>| -> Value {
            Value::Object(privs.into_iter().map(|(p, prop)| (p, json!(u8::from(prop)))).collect())
        };
        let mut out = Map::new();
        match (r.p("path"), &self.acl) {
            (Some(path), Some(acl)) => {
                out.insert(path.to_string(), to_json(acl.permissions(userid, path)));
            }
            (Some(path), None) => {
                out.insert(path.to_string(), to_json(everything()));
            }
            (None, Some(acl)) => {
                for (path, privs) in acl.effective(userid) {
                    out.insert(path, to_json(privs));
                }
            }
            (None, None) => {
                for path in [
                    "/",
                    "/access",
                    "/access/groups",
                    "/nodes",
                    "/pool",
                    "/sdn",
                    "/storage",
                    "/vms",
                ] {
                    out.insert(path.to_string(), to_json(everything()));
                }
            }
        }
        Ok(Value::Object(out))
    }

    /// `GET /nodes/{node}/network`: the host's NIC and its bridges (`vmbr0` by default).
    fn network(&self, ty: Option<&str>) -> Value {
        let mut items = vec![json!({
            "iface": "eno1", "type": "eth", "method": "manual", "method6": "manual",
            "families": ["inet"], "active": 1, "exists": 1, "autostart": 1, "priority": 3,
        })];
        for (i, bridge) in self.bridges.iter().enumerate() {
            let mut b = json!({
                "iface": bridge, "type": "bridge", "method": "manual", "method6": "manual",
                "families": ["inet"], "active": 1, "autostart": 1, "priority": 4 + i,
                "bridge_stp": "off", "bridge_fd": "0", "bridge_ports": if i == 0 { "eno1" } else { "" },
            });
            if i == 0 {
                // TEST-NET-1: the host's address is data here, never dialed.
                let o = b.as_object_mut().expect("an object");
                o.insert("method".into(), json!("static"));
                o.insert("cidr".into(), json!("192.0.2.10/24"));
                o.insert("address".into(), json!("192.0.2.10"));
                o.insert("netmask".into(), json!("24"));
                o.insert("gateway".into(), json!("192.0.2.1"));
            }
            items.push(b);
        }
        let keep = |t: &str| match ty {
            None => true,
            Some("any_bridge" | "any_local_bridge") => t == "bridge" || t == "OVSBridge",
            Some(want) => t == want,
        };
        Value::Array(
            items
                .into_iter()
                .filter(|i| keep(i.get("type").and_then(Value::as_str).unwrap_or("")))
                .collect(),
        )
    }

    fn storage_json(st: &store::StorageInfo, with_id: bool) -> Value {
        let mut m = Map::new();
        if with_id {
            m.insert("storage".into(), json!(st.id));
        }
        m.insert("type".into(), json!(st.plugin));
        m.insert("content".into(), json!(st.content));
        m.insert("active".into(), json!(1));
        m.insert("enabled".into(), json!(1));
        m.insert("shared".into(), json!(0));
        m.insert("total".into(), json!(st.total));
        m.insert("used".into(), json!(st.used));
        m.insert("avail".into(), json!(st.total.saturating_sub(st.used)));
        if with_id {
            let fraction = if st.total == 0 {
                0.0
            } else {
                st.used as f64 / st.total as f64
            };
            m.insert("used_fraction".into(), json!(fraction));
        }
        Value::Object(m)
    }

    /// `GET /nodes/{node}/storage` (pve-storage `API2::Storage::Status::index`): the storages
    /// the caller may see, filtered by content and id.
    fn storage_index(&self, r: &Req) -> Value {
        let perms = self.perms(&r.authid);
        let wanted_content: Vec<&str> = r.p("content").map(|c| c.split(',').collect()).unwrap_or_default();
        let items: Vec<Value> = self
            .store
            .storages(r.node())
            .iter()
            .filter(|st| storage_visible(&perms, st.id))
            .filter(|st| r.p("storage").is_none_or(|s| s == st.id))
            .filter(|st| wanted_content.iter().all(|c| st.content.split(',').any(|x| x == *c)))
            .map(|st| Shared::storage_json(st, true))
            .collect();
        Value::Array(items)
    }

    fn find_storage(&self, node: &str, storage: &str) -> Result<store::StorageInfo, ApiError> {
        self.store
            .storages(node)
            .into_iter()
            .find(|st| st.id == storage)
            .ok_or_else(|| ApiError::die(format!("storage '{storage}' does not exist")))
    }

    /// `GET /nodes/{node}/storage/{storage}/status`.
    fn storage_status(&self, r: &Req) -> Result<Value, ApiError> {
        let st = self.find_storage(r.node(), r.p("storage").unwrap_or(""))?;
        Ok(Shared::storage_json(&st, false))
    }

    /// `GET /nodes/{node}/storage/{storage}/content`: templates, ISOs and backups of `local`,
    /// guest disks of `local-lvm`; disks only of guests the caller may audit.
    fn storage_content(&self, r: &Req) -> Result<Value, ApiError> {
        let storage = r.p("storage").unwrap_or("");
        let st = self.find_storage(r.node(), storage)?;
        if let Some(c) = r.p("content")
            && !st.content.split(',').any(|x| x == c)
        {
            return Ok(Value::Array(Vec::new()));
        }
        let perms = self.perms(&r.authid);
        let vmid_filter: Option<u32> = r.p("vmid").and_then(|v| v.parse().ok());
        let items: Vec<Value> = self
            .store
            .volumes(r.node(), storage)
            .into_iter()
            .filter(|v| r.p("content").is_none_or(|c| c == v.content))
            .filter(|v| vmid_filter.is_none_or(|id| v.vmid == Some(id)))
            .filter(|v| v.vmid.is_none_or(|id| perms.has(&format!("/vms/{id}"), "VM.Audit")))
            .map(|v| {
                let mut m = Map::new();
                m.insert("volid".into(), json!(v.volid));
                m.insert("content".into(), json!(v.content));
                m.insert("format".into(), json!(v.format));
                m.insert("size".into(), json!(v.size));
                if v.ctime > 0 {
                    m.insert("ctime".into(), json!(v.ctime));
                }
                if let Some(id) = v.vmid {
                    m.insert("vmid".into(), json!(id));
                }
                Value::Object(m)
            })
            .collect();
        Ok(Value::Array(items))
    }

    /// One guest as `GET /cluster/resources` and `GET /nodes/{node}/{lxc,qemu}` show it.
    fn guest_summary(&self, g: &Loaded) -> Map<String, Value> {
        let c = &g.conf;
        let uptime = self.store.uptime(g.vmid, now());
        let running = uptime.is_some();
        let (name, maxmem, cpus, maxdisk) = match g.kind {
            PveKind::Lxc => {
                let disk = c
                    .options
                    .get("rootfs")
                    .and_then(|v| v.split(',').find_map(|p| p.strip_prefix("size=")))
                    .and_then(guest::parse_size)
                    .unwrap_or(0);
                let cpus = c
                    .options
                    .get("cpulimit")
                    .and_then(|v| v.parse::<f64>().ok())
                    .filter(|v| *v > 0.0)
                    .or_else(|| num_opt(c, "cores").map(|v| v as f64))
                    .unwrap_or(NODE_CPUS as f64);
                (
                    c.options
                        .get("hostname")
                        .cloned()
                        .unwrap_or_else(|| format!("CT{}", g.vmid)),
                    num_opt(c, "memory").unwrap_or(512) << 20,
                    cpus,
                    disk,
                )
            }
            PveKind::Qemu => {
                let disk = c
                    .options
                    .iter()
                    .filter(|(k, v)| guest::is_qemu_drive(k) && !v.contains("media=cdrom"))
                    .filter_map(|(_, v)| v.split(',').find_map(|p| p.strip_prefix("size=")))
                    .filter_map(guest::parse_size)
                    .max()
                    .unwrap_or(0);
                let memory = c
                    .options
                    .get("memory")
                    .and_then(|m| {
                        m.split(',')
                            .find_map(|p| p.strip_prefix("current=").or((!p.contains('=')).then_some(p)))
                    })
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(2048);
                let vcpus = num_opt(c, "sockets").unwrap_or(1) * num_opt(c, "cores").unwrap_or(1);
                (
                    c.options
                        .get("name")
                        .cloned()
                        .unwrap_or_else(|| format!("VM {}", g.vmid)),
                    memory << 20,
                    vcpus as f64,
                    disk,
                )
            }
        };
        let mut m = Map::new();
        m.insert("vmid".into(), json!(g.vmid));
        m.insert("name".into(), json!(name));
        m.insert("status".into(), json!(if running { "running" } else { "stopped" }));
        m.insert("maxmem".into(), json!(maxmem));
        m.insert("mem".into(), json!(if running { maxmem / 4 } else { 0 }));
        m.insert("maxdisk".into(), json!(maxdisk));
        m.insert("disk".into(), json!(if running { maxdisk / 10 } else { 0 }));
        m.insert("cpus".into(), json!(cpus));
        m.insert("cpu".into(), json!(if running { 0.01 } else { 0.0 }));
        m.insert("uptime".into(), json!(uptime.unwrap_or(0)));
        for k in ["netin", "netout", "diskread", "diskwrite"] {
            m.insert(k.into(), json!(0));
        }
        if g.kind == PveKind::Lxc {
            let swap = num_opt(c, "swap").unwrap_or(512) << 20;
            m.insert("maxswap".into(), json!(swap));
            m.insert("swap".into(), json!(0));
        }
        if let Some(tags) = c.options.get("tags") {
            m.insert("tags".into(), json!(tags));
        }
        if let Some(l) = c.options.get("lock") {
            m.insert("lock".into(), json!(l));
        }
        if c.options.get("template").map(String::as_str) == Some("1") {
            m.insert("template".into(), json!(1));
        }
        m
    }

    fn vmlist(&self, node: &str, kind: PveKind, perms: &Perms) -> Value {
        let items: Vec<Value> = self
            .store
            .list()
            .iter()
            .filter(|g| g.node == node && g.kind == kind)
            .filter(|g| perms.has(&format!("/vms/{}", g.vmid), "VM.Audit"))
            .map(|g| {
                let mut m = self.guest_summary(g);
                if kind == PveKind::Lxc {
                    m.insert("type".into(), json!("lxc"));
                }
                Value::Object(m)
            })
            .collect();
        Value::Array(items)
    }

    fn resources(&self, ty: Option<&str>, perms: &Perms) -> Value {
        let mut items = Vec::new();
        if ty.is_none() || ty == Some("vm") {
            for g in self.store.list() {
                if !perms.has(&format!("/vms/{}", g.vmid), "VM.Audit") {
                    continue;
                }
                let mut m = self.guest_summary(&g);
                let kind = match g.kind {
                    PveKind::Lxc => "lxc",
                    PveKind::Qemu => "qemu",
                };
                let cpus = m.remove("cpus").unwrap_or(json!(1));
                m.remove("maxswap");
                m.remove("swap");
                m.insert("maxcpu".into(), cpus);
                m.insert("id".into(), json!(format!("{kind}/{}", g.vmid)));
                m.insert("type".into(), json!(kind));
                m.insert("node".into(), json!(g.node));
                m.entry("template").or_insert(json!(0));
                items.push(Value::Object(m));
            }
        }
        if (ty.is_none() || ty == Some("node"))
            && let Value::Array(nodes) = self.nodes_index()
        {
            for mut n in nodes {
                if let Some(o) = n.as_object_mut() {
                    o.remove("ssl_fingerprint");
                    o.insert("cgroup-mode".into(), json!(2));
                }
                items.push(n);
            }
        }
        if ty.is_none() || ty == Some("storage") {
            for n in &self.store.nodes {
                for st in self.store.storages(n) {
                    if !storage_visible(perms, st.id) {
                        continue;
                    }
                    items.push(json!({
                        "id": format!("storage/{n}/{}", st.id), "type": "storage", "storage": st.id,
                        "node": n, "status": "available", "content": st.content, "plugintype": st.plugin,
                        "shared": 0, "disk": st.used, "maxdisk": st.total,
                    }));
                }
            }
        }
        Value::Array(items)
    }

    /// `GET /nodes/{node}/tasks/{upid}/status` (pve-manager `API2::Tasks::read_task_status`).
    fn task_status(&self, r: &Req) -> Result<Value, ApiError> {
        let (node, upid) = (r.node(), r.p("upid").unwrap_or(""));
        let fields: Vec<&str> = upid.split(':').collect();
        let parses = fields.len() == 9
            && fields[0] == "UPID"
            && store::valid_node_name(fields[1])
            && fields[2].len() == 8
            && (8..=9).contains(&fields[3].len())
            && fields[4].len() == 8
            && [fields[2], fields[3], fields[4]]
                .iter()
                .all(|f| f.bytes().all(|b| b.is_ascii_hexdigit()))
            && !fields[5].is_empty()
            && !fields[7].is_empty()
            && fields[8].is_empty();
        if !parses {
            return Err(ApiError::param("upid", "unable to parse worker upid"));
        }
        let tasks = lock(&self.tasks);
        let Some(t) = tasks.get(upid).filter(|t| t.node == node) else {
            return Err(ApiError::param("upid", "no such task"));
        };
        // Everyone may read their own tasks; others' need Sys.Audit on the node.
        if t.user != r.authid {
            self.perms(&r.authid).check(&format!("/nodes/{node}"), &["Sys.Audit"])?;
        }
        let mut m = Map::new();
        m.insert("upid".into(), json!(upid));
        m.insert("node".into(), json!(t.node));
        m.insert("pid".into(), json!(t.pid));
        m.insert("pstart".into(), json!(t.pstart));
        m.insert("starttime".into(), json!(t.starttime));
        m.insert("type".into(), json!(t.kind));
        m.insert("id".into(), json!(t.id));
        match t.user.split_once('!') {
            Some((user, token)) => {
                m.insert("user".into(), json!(user));
                m.insert("tokenid".into(), json!(token));
            }
            None => {
                m.insert("user".into(), json!(t.user));
            }
        }
        match &t.exit {
            Some(exit) => {
                m.insert("status".into(), json!("stopped"));
                m.insert("exitstatus".into(), json!(exit));
            }
            None => {
                m.insert("status".into(), json!("running"));
            }
        }
        Ok(Value::Object(m))
    }

    // ---- guests ------------------------------------------------------------------------------

    /// `POST /nodes/{node}/lxc` (pve-container `create_vm`, without restore).
    fn lxc_create(self: &Arc<Self>, r: &Req) -> Result<Value, ApiError> {
        let node = r.node().to_string();
        let vmid = r.vmid();
        let mut p = r.params.clone();
        for k in [
            "node",
            "vmid",
            "ignore-unpack-errors",
            "bwlimit",
            "ha-managed",
            "password",
            "ssh-public-keys",
            "pool",
            "unique",
            "force",
        ] {
            p.remove(k);
        }
        let start = p.remove("start").as_deref() == Some("1");
        if p.remove("restore").as_deref() == Some("1") {
            return Err(ApiError::die("sandbox: restoring a backup is not supported"));
        }
        // Since PVE 7, a new container is unprivileged unless told otherwise.
        let unprivileged = p.remove("unprivileged").as_deref() != Some("0");
        let ostemplate = p.remove("ostemplate").unwrap_or_default();
        let storage = p.remove("storage").unwrap_or_else(|| "local".into());

        let perms = self.perms(&r.authid);
        if !unprivileged {
            perms.check("/", &["Sys.Modify"])?;
        }
        let io = self.io();
        self.check_vmid_unused(vmid)?;
        if !perms.has(&format!("/vms/{vmid}"), "VM.Allocate") {
            return Err(ApiError::status(403, "Permission check failed\n"));
        }
        guest::lxc_check_perm(&r.authid, None, &p, &[], unprivileged)?;
        guest::lxc_check_privs(&perms, vmid, None, &p, &[])?;
        guest::check_ostemplate(&ostemplate)?;
        perms.check_template_access(&ostemplate)?;
        let (conf, mp_param) = guest::lxc_create_prepare(vmid, &p, &storage, unprivileged, &r.authid, self.seed)?;
        for value in mp_param.values() {
            if let Some((Some(sid), _)) = guest::new_disk(value.split(',').next().unwrap_or("")) {
                perms.check(&format!("/storage/{sid}"), &["Datastore.AllocateSpace"])?;
            }
        }
        // create_and_lock_config: the id is taken at once.
        let mut placeholder = GuestConf::new(PveKind::Lxc);
        placeholder.options.insert("lock".into(), "create".into());
        self.store.write(&node, PveKind::Lxc, vmid, &placeholder)?;
        drop(io);

        let task_node = node.clone();
        Ok(Value::String(self.spawn_task(
            &node,
            "vzcreate",
            vmid.to_string(),
            &r.authid,
            move |sh| {
                let result = guest::lxc_create_finish(conf, &mp_param, vmid, &ostemplate).and_then(|c| {
                    sh.store.write(&task_node, PveKind::Lxc, vmid, &c)?;
                    if start {
                        sh.store.set_running(vmid, true, now())?;
                    }
                    Ok(())
                });
                if result.is_err() {
                    let _ = sh.store.remove(&task_node, PveKind::Lxc, vmid);
                }
                result
            },
        )))
    }

    /// `POST /nodes/{node}/qemu` (qemu-server `create_vm`, without restore or import).
    fn qemu_create(self: &Arc<Self>, r: &Req) -> Result<Value, ApiError> {
        let node = r.node().to_string();
        let vmid = r.vmid();
        if r.p("archive").is_some() {
            return Err(ApiError::die("sandbox: restoring a backup is not supported"));
        }
        let start = r.flag("start");
        let params: BTreeMap<String, String> = r
            .params
            .iter()
            .filter(|(k, _)| k.as_str() == "cdrom" || guest::option_exists(PveKind::Qemu, k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let keys: Vec<String> = params.keys().cloned().collect();
        let perms = self.perms(&r.authid);
        let io = self.io();
        self.check_vmid_unused(vmid)?;
        if !perms.has(&format!("/vms/{vmid}"), "VM.Allocate") {
            return Err(ApiError::status(403, "Permission check failed\n"));
        }
        guest::qemu_check_privs(&perms, vmid, &params, &[], false)?;
        guest::qemu_check_perm(&r.authid, &keys)?;
        for (k, v) in &params {
            if guest::is_qemu_drive(k)
                && let Some((Some(storage), _)) = guest::new_disk(v.split(',').next().unwrap_or(""))
                && !guest::storage_holds_disks(storage)
            {
                return Err(ApiError::die(format!(
                    "storage '{storage}' does not support content-type 'images'"
                )));
            }
        }
        lock(&self.creating).insert(vmid, node.clone());
        drop(io);

        let task_node = node.clone();
        let seed = self.seed;
        Ok(Value::String(self.spawn_task(
            &node,
            "qmcreate",
            vmid.to_string(),
            &r.authid,
            move |sh| {
                lock(&sh.creating).remove(&vmid);
                let c = guest::qemu_create_conf(vmid, &params, seed, now())?;
                sh.store.write(&task_node, PveKind::Qemu, vmid, &c)?;
                if start {
                    sh.store.set_running(vmid, true, now())?;
                }
                Ok(())
            },
        )))
    }

    /// `DELETE /nodes/{node}/{lxc,qemu}/{vmid}`.
    fn destroy(self: &Arc<Self>, r: &Req) -> Result<Value, ApiError> {
        let (node, kind, vmid) = (r.node().to_string(), r.kind(), r.vmid());
        let force = r.flag("force");
        let io = self.io();
        let g = self.load(&node, kind, vmid)?;
        if g.conf.options.get("protection").map(String::as_str) == Some("1") {
            return Err(ApiError::die(format!(
                "can't remove {} {vmid} - protection mode enabled",
                type_str(kind)
            )));
        }
        if !(kind == PveKind::Qemu && r.flag("skiplock")) {
            check_lock(kind, &g.conf)?;
        }
        let running = self.store.is_running(vmid);
        match kind {
            PveKind::Lxc if running && !force => {
                return Err(ApiError::die(format!(
                    "unable to destroy CT {vmid} - container is running"
                )));
            }
            PveKind::Qemu if running => {
                return Err(ApiError::die(format!("VM {vmid} is running - destroy failed")));
            }
            _ => {}
        }
        drop(io);
        let task = if kind == PveKind::Lxc { "vzdestroy" } else { "qmdestroy" };
        let task_node = node.clone();
        Ok(Value::String(self.spawn_task(
            &node,
            task,
            vmid.to_string(),
            &r.authid,
            move |sh| {
                let g = sh.load(&task_node, kind, vmid)?;
                check_lock(kind, &g.conf)?;
                if sh.store.is_running(vmid) && !force {
                    return Err(ApiError::die(format!(
                        "unable to destroy {} {vmid} - running",
                        type_str(kind)
                    )));
                }
                sh.store.remove(&task_node, kind, vmid)?;
                sh.store.set_running(vmid, false, now())?;
                Ok(())
            },
        )))
    }

    fn get_config(&self, r: &Req) -> Result<Value, ApiError> {
        let (node, kind, vmid) = (r.node(), r.kind(), r.vmid());
        if let Some(snap) = r.p("snapshot") {
            if r.flag("current") {
                let msg = "cannot use 'snapshot' parameter with 'current'";
                let errors = BTreeMap::from([
                    ("snapshot".to_string(), msg.to_string()),
                    ("current".to_string(), msg.to_string()),
                ]);
                return Err(ApiError::param_map(errors));
            }
            let g = self.load(node, kind, vmid)?;
            if !g.conf.snapshots.contains_key(snap) {
                return Err(ApiError::die(format!("snapshot '{snap}' does not exist")));
            }
            let mut snap_conf = GuestConf::new(kind);
            snap_conf.current = g.conf.snapshots[snap].clone();
            return Ok(guest::api_config(&snap_conf, &g.digest, true));
        }
        let g = self.load(node, kind, vmid)?;
        Ok(guest::api_config(&g.conf, &g.digest, r.flag("current")))
    }

    fn pending(&self, r: &Req) -> Result<Value, ApiError> {
        let g = self.load(r.node(), r.kind(), r.vmid())?;
        Ok(guest::pending_array(&g.conf, &g.digest))
    }

    /// Someone else edits the file between the client's read and its write (the knob).
    fn external_edit(&self, node: &str, kind: PveKind, vmid: u32) -> Result<(), ApiError> {
        if let Some(mut g) = self.store.load(node, kind, vmid)? {
            let mut text = g.conf.description.trim_end().to_string();
            if !text.is_empty() {
                text.push('\n');
            }
            text.push_str(&format!("edited outside driftless at {}", now()));
            guest::sset(&mut g.conf.current, kind, "description", &text);
            self.store.write(node, kind, vmid, &g.conf)?;
        }
        Ok(())
    }

    /// `PUT .../config` (synchronous) and `POST /nodes/{node}/qemu/{vmid}/config` (a task).
    fn update_config(self: &Arc<Self>, r: &Req, sync: bool) -> Result<Value, ApiError> {
        let (node, kind, vmid) = (r.node().to_string(), r.kind(), r.vmid());
        let mut p = r.params.clone();
        p.remove("node");
        p.remove("vmid");
        let digest = p.remove("digest");
        let skiplock = p.remove("skiplock").as_deref() == Some("1");
        if kind == PveKind::Qemu {
            p.remove("background_delay");
            p.remove("force");
        }
        if p.is_empty() {
            return Err(ApiError::die("no options specified"));
        }
        let delete = guest::split_list(&p.remove("delete").unwrap_or_default());
        let revert = guest::split_list(&p.remove("revert").unwrap_or_default());
        if skiplock && r.authid != "root@pam" {
            return Err(ApiError::param("skiplock", "Only root may use this option."));
        }

        let io = self.io();
        if self.knobs.take_edit_between() {
            self.external_edit(&node, kind, vmid)?;
        }
        let g = self.load(&node, kind, vmid)?;
        let mut conf = g.conf;
        let digest_ok = digest.as_deref().is_none_or(|d| d.is_empty() || d == g.digest);
        match kind {
            PveKind::Lxc => {
                check_lock(kind, &conf)?;
                if !digest_ok {
                    return Err(ApiError::die(
                        "detected modified configuration - file changed by other user? Try again.",
                    ));
                }
                let unprivileged = conf.options.get("unprivileged").map(String::as_str) == Some("1");
                guest::lxc_check_perm(&r.authid, Some(&conf.current), &BTreeMap::new(), &delete, unprivileged)?;
                guest::lxc_check_perm(&r.authid, Some(&conf.current), &BTreeMap::new(), &revert, unprivileged)?;
                for opt in &revert {
                    if !guest::option_exists(kind, opt) {
                        return Err(ApiError::param("revert", format!("unknown option '{opt}'")));
                    }
                    if p.contains_key(opt) {
                        return Err(ApiError::param(
                            "revert",
                            format!("you can't use '-{opt}' and '-revert {opt}' at the same time"),
                        ));
                    }
                }
                for opt in &delete {
                    if !guest::option_exists(kind, opt) {
                        return Err(ApiError::param("delete", format!("unknown option '{opt}'")));
                    }
                    if p.contains_key(opt) {
                        return Err(ApiError::param(
                            "delete",
                            format!("you can't use '-{opt}' and -delete {opt}' at the same time"),
                        ));
                    }
                    if revert.contains(opt) {
                        return Err(ApiError::param(
                            "delete",
                            format!("you can't use '-delete {opt}' and '-revert {opt}' at the same time"),
                        ));
                    }
                }
                guest::lxc_check_perm(&r.authid, Some(&conf.current), &p, &[], unprivileged)?;
                let removed: Vec<String> = delete.iter().chain(revert.iter()).cloned().collect();
                guest::lxc_check_privs(&self.perms(&r.authid), vmid, Some(&conf.current), &p, &removed)?;
            }
            PveKind::Qemu => {
                for opt in &delete {
                    let o = if opt == "cdrom" { "ide2" } else { opt.as_str() };
                    if !guest::option_exists(kind, o) {
                        return Err(ApiError::param("delete", format!("unknown option '{opt}'")));
                    }
                    if p.contains_key(opt) {
                        return Err(ApiError::param(
                            "delete",
                            format!("you can't use '-{opt}' and -delete {opt}' at the same time"),
                        ));
                    }
                }
                let keys: Vec<String> = p.keys().chain(delete.iter()).cloned().collect();
                guest::qemu_check_privs(&self.perms(&r.authid), vmid, &p, &delete, true)?;
                guest::qemu_check_perm(&r.authid, &keys)?;
                if !digest_ok {
                    return Err(ApiError::die("checksum missmatch (file change by other user?)"));
                }
                if !skiplock {
                    check_lock(kind, &conf)?;
                }
            }
        }
        let running = self.store.is_running(vmid);
        let changes = Changes { set: p, delete, revert };
        match kind {
            PveKind::Lxc => guest::lxc_update(&mut conf, vmid, running, &changes, self.seed)?,
            PveKind::Qemu => guest::qemu_update(&mut conf, vmid, running, &changes, self.seed)?,
        }
        self.store.write(&node, kind, vmid, &conf)?;
        drop(io);
        if sync {
            Ok(Value::Null)
        } else {
            Ok(Value::String(self.spawn_task(
                &node,
                "qmconfig",
                vmid.to_string(),
                &r.authid,
                |_| Ok(()),
            )))
        }
    }

    /// `GET .../status/current`.
    fn status_current(&self, r: &Req) -> Result<Value, ApiError> {
        let g = self.load(r.node(), r.kind(), r.vmid())?;
        let mut m = self.guest_summary(&g);
        m.insert("ha".into(), json!({"managed": 0}));
        match g.kind {
            PveKind::Lxc => {
                m.insert("type".into(), json!("lxc"));
            }
            PveKind::Qemu => {
                let status = m.get("status").cloned().unwrap_or(json!("stopped"));
                m.insert("qmpstatus".into(), status);
                let agent = g
                    .conf
                    .options
                    .get("agent")
                    .is_some_and(|a| a.split(',').any(|p| p == "1" || p == "enabled=1"));
                if agent {
                    m.insert("agent".into(), json!(1));
                }
            }
        }
        Ok(Value::Object(m))
    }

    /// `POST .../status/{start,shutdown,stop,reboot}`.
    fn power(self: &Arc<Self>, r: &Req, action: &str) -> Result<Value, ApiError> {
        let (node, kind, vmid) = (r.node().to_string(), r.kind(), r.vmid());
        if r.flag("skiplock") && r.authid != "root@pam" {
            return Err(ApiError::param("skiplock", "Only root may use this option."));
        }
        let io = self.io();
        self.load(&node, kind, vmid)?;
        let running = self.store.is_running(vmid);
        let t = type_str(kind);
        match (kind, action) {
            (_, "start") if running => return Err(ApiError::die(format!("{t} {vmid} already running"))),
            (PveKind::Lxc, "stop" | "shutdown") if !running => {
                return Err(ApiError::die(format!("CT {vmid} not running")));
            }
            // pve-container says "VM" here too.
            (_, "reboot") if !running => return Err(ApiError::die(format!("VM {vmid} not running"))),
            _ => {}
        }
        drop(io);
        let prefix = if kind == PveKind::Lxc { "vz" } else { "qm" };
        let action = action.to_string();
        let task_node = node.clone();
        Ok(Value::String(self.spawn_task(
            &node,
            &format!("{prefix}{action}"),
            vmid.to_string(),
            &r.authid,
            move |sh| {
                let g = sh.load(&task_node, kind, vmid)?;
                let mut conf = g.conf;
                if !(action == "stop" && kind == PveKind::Qemu) {
                    check_lock(kind, &conf)?;
                }
                if action == "start" && conf.options.get("template").map(String::as_str) == Some("1") {
                    return Err(ApiError::die(match kind {
                        PveKind::Lxc => "you can't start a CT if it's a template",
                        PveKind::Qemu => "you can't start a vm if it's a template",
                    }));
                }
                match action.as_str() {
                    "start" | "reboot" => {
                        if !conf.pending.is_empty() || !conf.pending_delete.is_empty() {
                            guest::apply_all_pending(&mut conf, vmid, sh.seed)?;
                            sh.store.write(&task_node, kind, vmid, &conf)?;
                        }
                        sh.store.set_running(vmid, true, now())?;
                    }
                    _ => sh.store.set_running(vmid, false, now())?,
                }
                Ok(())
            },
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_parsing_and_header_extraction() {
        let a = TokenAuth::parse("root@pam!driftless=s3cret").unwrap();
        let mut h = HeaderMap::new();
        assert_eq!(a.verify(&h).unwrap_err(), "No ticket");
        h.insert(
            header::AUTHORIZATION,
            "PVEAPIToken=root@pam!driftless=s3cret".parse().unwrap(),
        );
        assert_eq!(a.verify(&h).unwrap(), "root@pam!driftless");
        h.insert(
            header::AUTHORIZATION,
            "PVEAPIToken=root@pam!driftless=nope".parse().unwrap(),
        );
        assert_eq!(a.verify(&h).unwrap_err(), "invalid token value!");
        h.insert(
            header::AUTHORIZATION,
            "PVEAPIToken=root@pam!other=s3cret".parse().unwrap(),
        );
        assert_eq!(a.verify(&h).unwrap_err(), "no such token 'other' for user 'root@pam'");
        h.insert(
            header::AUTHORIZATION,
            "PVEAPIToken=bob@pve!driftless=s3cret".parse().unwrap(),
        );
        assert_eq!(a.verify(&h).unwrap_err(), "no such user ('bob@pve')");
        assert!(TokenAuth::parse("root@pam=x").is_err());
    }

    #[test]
    fn urlencoded_bodies_decode_like_proxmox() {
        let p = decode_urlencoded("a=1&b=x+y%3Az;c=%2C&a=2");
        assert_eq!(p["a"], "1\u{0}2");
        assert_eq!(p["b"], "x y:z");
        assert_eq!(p["c"], ",");
    }
}
