//! A sandbox Proxmox VE: the API subset driftless uses, served on loopback over HTTPS with a
//! self-signed certificate, backed by config files laid out like `/etc/pve`.
//!
//! * [`start`] serves it; [`SandboxHandle`] says where (URL, certificate fingerprint, CA PEM,
//!   token) and holds the runtime [`Knobs`] (latency, injected errors, a concurrent edit,
//!   request counters).
//! * State: `STATE/nodes/<node>/lxc/<vmid>.conf` and `STATE/nodes/<node>/qemu-server/<vmid>.conf`
//!   in Proxmox's exact format (written and parsed with [`driftless::pve::conf`]), re-read on every
//!   request, so an edit by another process is seen at once; power state in
//!   `STATE/.sandbox/status.json`. Writes are atomic (temporary file, then rename).
//! * [`pct`] edits the same files the way `pct set` / `pct config` does as `root@pam` on the
//!   node (no API-token permission limits): what driftless runs over SSH.
//!
//! Behaviour follows pve-container, qemu-server, pve-http-server and pve-access-control (see
//! `proxmox.rs` and `guest.rs` for what is mimicked and where the sandbox is simpler).

pub mod access;
pub mod cluster_state;
mod guest;
pub mod k3s_sim;
pub mod kube_api;
mod pct;
mod proxmox;
mod store;
pub mod talos_api;
pub mod talos_schema;
mod tls;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use access::{Acl, AclEntry};
pub use k3s_sim::{ExecOutput, exec as pct_exec};
pub use pct::pct;

/// How to run the sandbox.
#[derive(Clone)]
pub struct SandboxOptions {
    /// Where the `/etc/pve`-like tree lives (created when missing). Required.
    pub state_dir: PathBuf,
    /// Cluster node names (default `["pve"]`).
    pub nodes: Vec<String>,
    /// Serve HTTPS with a self-signed certificate (default); `false` serves plain HTTP.
    pub tls: bool,
    /// The API token accepted: `USER@REALM!TOKENID=SECRET`.
    pub token: String,
    /// More tokens accepted (a read-only one for plans, say), in the same form.
    pub extra_tokens: Vec<String>,
    /// Users, tokens and their privileges (see [`access`]); `None`: every token may do
    /// everything, as root's token without privilege separation does.
    pub acl: Option<Acl>,
    /// The Linux bridges of every node (`GET /nodes/{node}/network`); default `vmbr0`.
    pub bridges: Vec<String>,
    /// The size of every node's `local-lvm` (guest disks), in bytes; default 256 GiB.
    pub local_lvm_size: u64,
    /// Added before every answer; tasks also take this long (plus a few ms).
    pub latency: Duration,
    /// Fraction of requests answered with HTTP 500, chosen deterministically from `seed`.
    pub error_rate: f64,
    /// Seeds the injected errors and generated values (MAC addresses, UUIDs, default token).
    pub seed: u64,
    /// Where to listen (default `127.0.0.1:0`: a free port on loopback).
    pub bind: SocketAddr,
    /// Nodes of a cluster configured without a CNI (Talos `cni: none`, K3s `flannel-backend:
    /// none`) stay NotReady until a CNI add-on runs, as in a real cluster. Off by default for
    /// now: examples/homelab-talos chooses Cilium, which driftless does not install yet, and
    /// its nodes would never be Ready.
    pub require_cni: bool,
}

impl SandboxOptions {
    /// Defaults for everything but the state directory.
    pub fn new(state_dir: impl Into<PathBuf>) -> SandboxOptions {
        SandboxOptions {
            state_dir: state_dir.into(),
            ..SandboxOptions::default()
        }
    }
}

impl Default for SandboxOptions {
    fn default() -> SandboxOptions {
        let seed = 0;
        SandboxOptions {
            state_dir: PathBuf::new(),
            nodes: vec!["pve".to_string()],
            tls: true,
            token: default_token(seed),
            extra_tokens: Vec::new(),
            acl: None,
            bridges: vec!["vmbr0".to_string()],
            local_lvm_size: store::DEFAULT_LVM_SIZE,
            latency: Duration::ZERO,
            error_rate: 0.0,
            seed,
            bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            require_cni: false,
        }
    }
}

impl fmt::Debug for SandboxOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SandboxOptions")
            .field("state_dir", &self.state_dir)
            .field("nodes", &self.nodes)
            .field("tls", &self.tls)
            .field("token", &redact_token(&self.token))
            .field(
                "extra_tokens",
                &self.extra_tokens.iter().map(|t| redact_token(t)).collect::<Vec<_>>(),
            )
            .field("acl", &self.acl)
            .field("bridges", &self.bridges)
            .field("local_lvm_size", &self.local_lvm_size)
            .field("latency", &self.latency)
            .field("error_rate", &self.error_rate)
            .field("seed", &self.seed)
            .field("bind", &self.bind)
            .field("require_cni", &self.require_cni)
            .finish()
    }
}

/// `root@pam!driftless=<uuid-like secret derived from seed>`.
pub fn default_token(seed: u64) -> String {
    format!("root@pam!driftless={}", store::uuid_from(seed, "api-token"))
}

/// The token with its secret replaced: safe to print.
pub fn redact_token(token: &str) -> String {
    match token.split_once('=') {
        Some((id, _)) => format!("{id}=<secret>"),
        None => "<invalid token>".to_string(),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("invalid sandbox options: {0}")]
    Options(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS setup failed: {0}")]
    Tls(String),
    /// `pct` refused: the message is what pct prints (usage or Proxmox's error).
    #[error("{0}")]
    Pct(String),
}

impl SandboxError {
    fn io(path: &Path, source: std::io::Error) -> SandboxError {
        SandboxError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Settings that tests and benchmarks change while the sandbox runs, and its counters.
pub struct Knobs {
    latency_us: AtomicU64,
    error_rate_bits: AtomicU64,
    edit_between: AtomicBool,
    seed: u64,
    sequence: AtomicU64,
    counts: Mutex<BTreeMap<String, u64>>,
    task_durations: Mutex<TaskDurations>,
    tasks_running: AtomicU64,
    most_tasks_running: AtomicU64,
    offline: Mutex<std::collections::BTreeSet<String>>,
}

/// How long simulated tasks run (on top of the latency knob): a real host unpacks a template
/// to create a container (seconds), starts it in under one, and most other tasks are quick.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TaskDurations {
    /// `vzcreate`, `qmcreate`.
    pub create: Duration,
    /// `vzstart`, `qmstart`.
    pub start: Duration,
    /// Every other task (reboot, shutdown, stop, destroy, config).
    pub other: Duration,
}

impl TaskDurations {
    /// Times like a real Proxmox host's: create 3 s, start 0.8 s, others 0.3 s.
    pub fn realistic() -> TaskDurations {
        TaskDurations {
            create: Duration::from_secs(3),
            start: Duration::from_millis(800),
            other: Duration::from_millis(300),
        }
    }

    fn of(&self, task_type: &str) -> Duration {
        match task_type {
            "vzcreate" | "qmcreate" => self.create,
            "vzstart" | "qmstart" => self.start,
            _ => self.other,
        }
    }
}

impl Knobs {
    fn new(opts: &SandboxOptions) -> Knobs {
        let k = Knobs {
            latency_us: AtomicU64::new(0),
            error_rate_bits: AtomicU64::new(0),
            edit_between: AtomicBool::new(false),
            seed: opts.seed,
            sequence: AtomicU64::new(0),
            counts: Mutex::new(BTreeMap::new()),
            task_durations: Mutex::new(TaskDurations::default()),
            tasks_running: AtomicU64::new(0),
            most_tasks_running: AtomicU64::new(0),
            offline: Mutex::new(Default::default()),
        };
        k.set_latency(opts.latency);
        k.set_error_rate(opts.error_rate);
        k
    }

    pub fn latency(&self) -> Duration {
        Duration::from_micros(self.latency_us.load(Ordering::Relaxed))
    }

    pub fn set_latency(&self, latency: Duration) {
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.latency_us.store(us, Ordering::Relaxed);
    }

    pub fn error_rate(&self) -> f64 {
        f64::from_bits(self.error_rate_bits.load(Ordering::Relaxed))
    }

    /// Clamped to `0.0..=1.0`.
    pub fn set_error_rate(&self, rate: f64) {
        let rate = if rate.is_nan() { 0.0 } else { rate.clamp(0.0, 1.0) };
        self.error_rate_bits.store(rate.to_bits(), Ordering::Relaxed);
    }

    pub fn set_task_durations(&self, durations: TaskDurations) {
        *self.task_durations.lock().unwrap_or_else(|e| e.into_inner()) = durations;
    }

    /// How long a task of `task_type` (`vzcreate`, `vzstart`, ...) runs, latency included.
    fn task_duration(&self, task_type: &str) -> Duration {
        self.task_durations
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .of(task_type)
            + self.latency()
    }

    fn task_started(&self) {
        let now = self.tasks_running.fetch_add(1, Ordering::SeqCst) + 1;
        self.most_tasks_running.fetch_max(now, Ordering::SeqCst);
    }

    fn task_ended(&self) {
        self.tasks_running.fetch_sub(1, Ordering::SeqCst);
    }

    /// The most tasks that ran at the same time since the sandbox started.
    pub fn most_tasks_at_once(&self) -> u64 {
        self.most_tasks_running.load(Ordering::SeqCst)
    }

    /// When on, the next `PUT`/`POST .../config` first sees someone else edit the guest's
    /// file (its description changes), so a digest read before no longer matches. One shot.
    pub fn set_edit_between_read_and_write(&self, on: bool) {
        self.edit_between.store(on, Ordering::SeqCst);
    }

    pub fn edit_between_read_and_write(&self) -> bool {
        self.edit_between.load(Ordering::SeqCst)
    }

    fn take_edit_between(&self) -> bool {
        self.edit_between.swap(false, Ordering::SeqCst)
    }

    /// A node of the cluster goes offline (or comes back): `GET /nodes` says so, and what
    /// is asked of it fails as a request proxied to an unreachable node does (HTTP 595).
    pub fn set_node_offline(&self, node: &str, offline: bool) {
        let mut set = self.offline.lock().unwrap_or_else(|e| e.into_inner());
        if offline {
            set.insert(node.to_string());
        } else {
            set.remove(node);
        }
    }

    pub fn node_offline(&self, node: &str) -> bool {
        self.offline.lock().unwrap_or_else(|e| e.into_inner()).contains(node)
    }

    /// Requests received, by `METHOD /path/template` (e.g. `PUT /nodes/{node}/lxc/{vmid}/config`).
    pub fn request_counts(&self) -> BTreeMap<String, u64> {
        self.counts.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn total_requests(&self) -> u64 {
        self.request_counts().values().sum()
    }

    pub fn reset_request_counts(&self) {
        self.counts.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    fn count(&self, key: String) {
        *self
            .counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key)
            .or_insert(0) += 1;
    }

    /// Whether this request gets an injected 500: the n-th decision is a fixed function of
    /// (seed, n), so a sequential client sees the same failures on every run.
    fn should_fail(&self) -> bool {
        let rate = self.error_rate();
        if rate <= 0.0 {
            return false;
        }
        let n = self.sequence.fetch_add(1, Ordering::Relaxed);
        let r = store::splitmix64(self.seed ^ store::splitmix64(n)) >> 11;
        (r as f64 / (1u64 << 53) as f64) < rate
    }
}

/// A running sandbox. Dropping it leaves the server running until the runtime ends; call
/// [`SandboxHandle::shutdown`] to stop it.
pub struct SandboxHandle {
    /// `https://127.0.0.1:PORT` (or `http://` without TLS); the API is under `/api2/json`.
    pub url: String,
    pub addr: SocketAddr,
    /// SHA-256 of the certificate (DER), upper-case hex pairs joined by `:` like
    /// `pvenode cert info`; empty without TLS.
    pub fingerprint: String,
    /// The self-signed certificate (PEM), usable as a CA file; empty without TLS.
    pub ca_pem: String,
    /// The accepted token, `USER@REALM!TOKENID=SECRET`.
    pub token: String,
    pub state_dir: PathBuf,
    pub nodes: Vec<String>,
    /// The simulated Kubernetes API (its kubeconfig is in `STATE/.sandbox/k8s/`).
    pub kube: kube_api::KubeApiHandle,
    /// The simulated Talos API: every Talos node is reached through this endpoint.
    pub talos: talos_api::TalosApiHandle,
    knobs: Arc<Knobs>,
    server: proxmox::Server,
}

impl SandboxHandle {
    pub fn knobs(&self) -> &Knobs {
        &self.knobs
    }

    /// `url` + `/api2/json`.
    pub fn api_url(&self) -> String {
        format!("{}/api2/json", self.url)
    }

    /// The `Authorization` header value: `PVEAPIToken=USER@REALM!TOKENID=SECRET`.
    pub fn auth_header(&self) -> String {
        format!("PVEAPIToken={}", self.token)
    }

    pub fn request_counts(&self) -> BTreeMap<String, u64> {
        self.knobs.request_counts()
    }

    /// Stop serving and wait for running tasks to finish.
    pub async fn shutdown(self) {
        self.kube.shutdown().await;
        self.talos.shutdown().await;
        self.server.shutdown().await;
    }

    /// Nodes named here never become Ready (their kubelet keeps failing): for health gates.
    pub fn set_never_ready(&self, names: &[&str]) -> std::io::Result<()> {
        cluster_state::set_never_ready(&self.state_dir, names)
    }

    /// Turn the CNI rule on or off while running (see [`SandboxOptions::require_cni`]).
    pub fn set_require_cni(&self, on: bool) -> std::io::Result<()> {
        cluster_state::set_require_cni(&self.state_dir, on)
    }
}

impl fmt::Debug for SandboxHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SandboxHandle")
            .field("url", &self.url)
            .field("fingerprint", &self.fingerprint)
            .field("token", &redact_token(&self.token))
            .field("state_dir", &self.state_dir)
            .field("nodes", &self.nodes)
            .finish_non_exhaustive()
    }
}

/// Start the sandbox: create the state tree, generate the certificate, bind and serve.
pub async fn start(opts: SandboxOptions) -> Result<SandboxHandle, SandboxError> {
    if opts.state_dir.as_os_str().is_empty() {
        return Err(SandboxError::Options("state_dir is required".into()));
    }
    if opts.nodes.is_empty() {
        return Err(SandboxError::Options("at least one node is required".into()));
    }
    for node in &opts.nodes {
        if !store::valid_node_name(node) {
            return Err(SandboxError::Options(format!("invalid node name '{node}'")));
        }
    }
    let mut tokens = vec![opts.token.as_str()];
    tokens.extend(opts.extra_tokens.iter().map(String::as_str));
    let auth = proxmox::TokenAuth::parse_all(&tokens).map_err(SandboxError::Options)?;
    if let Some(acl) = &opts.acl {
        acl.check().map_err(|e| SandboxError::Options(format!("acl: {e}")))?;
    }
    for bridge in &opts.bridges {
        if !bridge
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
            || bridge.is_empty()
        {
            return Err(SandboxError::Options(format!("invalid bridge name '{bridge}'")));
        }
    }
    let mut store = store::Store::new(opts.state_dir.clone(), opts.nodes.clone());
    store.lvm_size = opts.local_lvm_size;
    store.init()?;
    store.write_seed(opts.seed)?;
    cluster_state::set_require_cni(&opts.state_dir, opts.require_cni)
        .map_err(|e| SandboxError::io(&cluster_state::dir(&opts.state_dir), e))?;

    let listener = std::net::TcpListener::bind(opts.bind).map_err(|source| SandboxError::Bind {
        addr: opts.bind,
        source,
    })?;
    listener.set_nonblocking(true).map_err(|source| SandboxError::Bind {
        addr: opts.bind,
        source,
    })?;
    let addr = listener.local_addr().map_err(|source| SandboxError::Bind {
        addr: opts.bind,
        source,
    })?;
    let host = if addr.ip().is_unspecified() {
        "127.0.0.1".to_string()
    } else if addr.is_ipv6() {
        format!("[{}]", addr.ip())
    } else {
        addr.ip().to_string()
    };

    let cert = if opts.tls {
        let node = opts.nodes[0].clone();
        Some(tls::SelfSigned::kept(&tls::dir(&opts.state_dir), "proxmox", || {
            tls::SelfSigned::generate(&node)
        })?)
    } else {
        None
    };
    let knobs = Arc::new(Knobs::new(&opts));
    let (fingerprint, ca_pem) = cert
        .as_ref()
        .map(|c| (c.fingerprint.clone(), c.pem.clone()))
        .unwrap_or_default();
    let server = proxmox::serve(proxmox::ServeArgs {
        listener,
        cert,
        store,
        knobs: knobs.clone(),
        auth,
        acl: opts.acl.clone(),
        bridges: opts.bridges.clone(),
        seed: opts.seed,
        fingerprint: fingerprint.clone(),
    })?;
    let scheme = if opts.tls { "https" } else { "http" };
    let kube_bind = SocketAddr::new(opts.bind.ip(), 0);
    let kube = kube_api::serve(opts.state_dir.clone(), kube_bind, opts.seed).await?;
    let talos = talos_api::serve(opts.state_dir.clone(), kube_bind, opts.seed).await?;
    Ok(SandboxHandle {
        url: format!("{scheme}://{host}:{}", addr.port()),
        addr,
        fingerprint,
        ca_pem,
        token: opts.token,
        state_dir: opts.state_dir,
        nodes: opts.nodes,
        kube,
        talos,
        knobs,
        server,
    })
}
