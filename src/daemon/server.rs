//! The daemon's HTTP server: health, readiness, metrics and the push webhook.
//!
//! - `GET /healthz`: 200 `ok` while the process serves.
//! - `GET /readyz`: 200 while `ready` is set (the last fetch succeeded), 503 before the first
//!   one and while fetches fail. With leader election the body says the role (`ready: leader`,
//!   `ready: follower, leader NAME`): a follower is ready too, since it is ready to take over,
//!   and a Deployment's rolling update waits for its new pods to be ready.
//! - `GET /metrics`: OpenMetrics text.
//! - `POST /webhook`: 404 when no secret is configured (webhooks off); 401 when the signature is
//!   missing or wrong, and nothing is triggered; 202 when verified, with a [`Trigger`] sent
//!   without waiting (a full channel means a reconcile is already pending, which is as good);
//!   200 `duplicate delivery, ignored` when the forge's delivery ID was already seen (a replay),
//!   and nothing is triggered. Bodies are limited to [`WEBHOOK_BODY_LIMIT`].
//!
//! The server faces whatever can reach its port, so every connection is bounded
//! ([`ServerLimits`]): a request head must arrive within `header_read_timeout` (hyper's timer,
//! which also runs while a keep-alive connection waits for its next request), a connection
//! outside any handler for `idle_timeout` is closed (a client that stops reading its response
//! included), each request gets `request_timeout`, and at most `max_connections` are open.
//! At the cap a new connection closes the one that has been idle longest (no request in its
//! handler), so a flood of slow connections (slowloris) cannot keep the health check of a
//! kubelet or systemd out: its fresh connection evicts a stalled one and is answered at once. Only
//! when every connection is inside a handler (each bounded by `request_timeout`) is a new
//! connection closed unanswered.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderValue, Request, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::sync::{Notify, mpsc, watch};
use tokio::time::Instant;

use super::leader::{Leadership, Role};
use super::metrics::Metrics;
use super::webhook::{self, Deliveries, Forge};

/// The largest webhook body accepted (forges send push payloads of a few KiB to a few hundred).
pub const WEBHOOK_BODY_LIMIT: usize = 1024 * 1024;

/// How many webhook delivery IDs are remembered to ignore replays. Forges redeliver within
/// minutes to days; 1024 covers far more pushes than a homelab makes between two replays.
pub const DELIVERY_IDS_REMEMBERED: usize = 1024;

/// The largest read buffer of a connection: request heads (forges send a few KiB of headers)
/// and body chunks pass through it. hyper's default (about 400 KiB) times the connection cap
/// would let slow clients pin 100 MB; 64 KiB keeps that to 16 MB.
const READ_BUFFER_LIMIT: usize = 64 * 1024;

pub const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// How long a connection may take and how many may be open; [`ServerLimits::default`] is what
/// the daemon serves with, tests shorten them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerLimits {
    /// Connections open at once. At the cap, a new connection evicts the one idle longest.
    pub max_connections: usize,
    /// The time a client has to send a complete request head, from accepting the connection or
    /// from the end of its previous response (so this is also the keep-alive idle time).
    pub header_read_timeout: Duration,
    /// The longest a connection may stay outside every handler: waiting for a request, or
    /// writing a response to a client that does not read it.
    pub idle_timeout: Duration,
    /// The longest a request may take in its handler, reading its body included; then 408.
    pub request_timeout: Duration,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            // Well below the 1024 open files of a default soft limit: the daemon's own fetches,
            // pushes and worker pipes need descriptors too, whatever clients do.
            max_connections: 256,
            // Forges, Prometheus and health checks send their whole request at once.
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(30),
        }
    }
}

/// Why the daemon loop should poll now rather than at its next interval.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trigger {
    /// A verified push webhook; `git_ref` is the payload's `ref` when it has one.
    Webhook { forge: Forge, git_ref: Option<String> },
}

/// What the handlers share.
#[derive(Clone)]
pub struct ServerState {
    pub metrics: Arc<Metrics>,
    /// Set once the first fetch succeeded.
    pub ready: Arc<AtomicBool>,
    /// The webhook secret; `None` turns `/webhook` off (404).
    pub webhook_secret: Option<Vec<u8>>,
    /// Where verified webhooks go; a small bounded channel (capacity 1 is enough: one pending
    /// trigger already means "poll soon").
    pub trigger: mpsc::Sender<Trigger>,
    /// The election's role; `None` without leader election.
    pub leadership: Option<Arc<Leadership>>,
}

impl fmt::Debug for ServerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerState")
            .field("ready", &self.ready.load(Ordering::Relaxed))
            .field("webhook_secret", &self.webhook_secret.as_ref().map(|_| "<redacted>"))
            .finish_non_exhaustive()
    }
}

/// The handlers' state: the caller's, and the delivery IDs seen so far.
struct Shared {
    state: ServerState,
    deliveries: Mutex<Deliveries>,
}

/// The routes, for [`serve`] or embedding.
pub fn router(state: ServerState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route(
            "/webhook",
            post(webhook).layer(DefaultBodyLimit::max(WEBHOOK_BODY_LIMIT)),
        )
        .with_state(Arc::new(Shared {
            state,
            deliveries: Mutex::new(Deliveries::new(DELIVERY_IDS_REMEMBERED)),
        }))
}

/// [`serve_with_limits`] with the production [`ServerLimits`].
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: ServerState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_with_limits(listener, state, ServerLimits::default(), shutdown).await
}

/// Serves until `shutdown` completes, then stops accepting: idle connections close at once,
/// requests in flight finish (within `request_timeout`).
pub async fn serve_with_limits(
    listener: tokio::net::TcpListener,
    state: ServerState,
    limits: ServerLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, webhook = state.webhook_secret.is_some(), ?limits, "HTTP server listening");
    }
    let app = router(state);
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(READ_BUFFER_LIMIT);
    let registry = Arc::new(Registry::default());
    // Each connection holds a receiver; `closed()` on the sender is "every connection ended".
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    let mut next_id = 0u64;
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of descriptors or a connection reset before it was accepted: wait a
                    // little rather than spin; connections that end free descriptors.
                    tracing::debug!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        next_id += 1;
        let Some(conn) = registry.admit(next_id, limits.max_connections) else {
            tracing::debug!("every connection is inside a handler; a new connection is closed unanswered");
            continue;
        };
        let service = TowerToHyperService::new(app.clone());
        let http = http.clone();
        let mut stop = stop_rx.clone();
        let registry = registry.clone();
        tokio::spawn(async move {
            let _registered = Registered {
                registry: &registry,
                id: conn.id,
            };
            let tracked = conn.clone();
            let handler = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let inside = tracked.enter();
                let call = hyper::service::Service::call(&service, req);
                async move {
                    let _inside = inside;
                    match tokio::time::timeout(limits.request_timeout, call).await {
                        Ok(answer) => answer,
                        Err(_) => Ok((StatusCode::REQUEST_TIMEOUT, "request timed out").into_response()),
                    }
                }
            });
            let connection = http.serve_connection(TokioIo::new(stream), handler);
            let mut connection = std::pin::pin!(connection);
            let mut draining = false;
            loop {
                tokio::select! {
                    result = connection.as_mut() => {
                        if let Err(e) = result {
                            tracing::debug!(error = %e, "connection ended with an error");
                        }
                        break;
                    }
                    () = conn.evicted.notified() => break,
                    () = conn.idle_for(limits.idle_timeout) => break,
                    _ = stop.wait_for(|stop| *stop), if !draining => {
                        if conn.is_idle() {
                            break;
                        }
                        connection.as_mut().graceful_shutdown();
                        draining = true;
                    }
                }
            }
        });
    }
    drop(listener);
    let _ = stop_tx.send(true);
    drop(stop_rx);
    stop_tx.closed().await;
    Ok(())
}

/// Raises this process's soft limit of open files to its hard limit (systemd's `LimitNOFILE`),
/// so clients of the server and the daemon's own fetches, pushes and workers do not share the
/// default soft limit of 1024. Returns the limit now in force.
pub fn raise_open_files_limit() -> std::io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed to them.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
    }
    // rlim_t is u64 on Linux, not on every target.
    #[allow(clippy::unnecessary_cast)]
    Ok(limit.rlim_cur as u64)
}

/// The open connections, to count them and to pick one to evict.
#[derive(Default)]
struct Registry {
    open: Mutex<HashMap<u64, Arc<Conn>>>,
}

impl Registry {
    /// Registers connection `id`; at `max` open, first evicts the connection idle longest.
    /// `None` when all are inside a handler: the new connection is the one to close.
    fn admit(&self, id: u64, max: usize) -> Option<Arc<Conn>> {
        let mut open = self.open.lock().expect("registry lock");
        if open.len() >= max {
            let oldest = open
                .iter()
                .filter_map(|(id, c)| c.idle_since().map(|since| (since, *id)))
                .min()
                .map(|(_, id)| id)?;
            let victim = open.remove(&oldest).expect("found above");
            // notify_one keeps the wake-up if the connection's task is not waiting right now.
            victim.evicted.notify_one();
        }
        let conn = Arc::new(Conn {
            id,
            activity: Mutex::new(Activity {
                in_handler: 0,
                idle_since: Instant::now(),
            }),
            evicted: Notify::new(),
        });
        open.insert(id, conn.clone());
        Some(conn)
    }
}

/// Removes a connection from the registry when its task ends, however it ends.
struct Registered<'a> {
    registry: &'a Registry,
    id: u64,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.registry.open.lock().expect("registry lock").remove(&self.id);
    }
}

/// One open connection: whether a request of it is in a handler, and since when it is not.
struct Conn {
    id: u64,
    activity: Mutex<Activity>,
    evicted: Notify,
}

struct Activity {
    in_handler: usize,
    idle_since: Instant,
}

impl Conn {
    /// `None` while a request is in a handler.
    fn idle_since(&self) -> Option<Instant> {
        let a = self.activity.lock().expect("activity lock");
        (a.in_handler == 0).then_some(a.idle_since)
    }

    fn is_idle(&self) -> bool {
        self.idle_since().is_some()
    }

    fn enter(self: &Arc<Self>) -> InHandler {
        self.activity.lock().expect("activity lock").in_handler += 1;
        InHandler(self.clone())
    }

    /// Completes once the connection has been outside every handler for `timeout`.
    async fn idle_for(&self, timeout: Duration) {
        loop {
            let check_at = match self.idle_since() {
                Some(since) if since + timeout <= Instant::now() => return,
                Some(since) => since + timeout,
                // In a handler: that is bounded by the request timeout; look again later.
                None => Instant::now() + timeout,
            };
            tokio::time::sleep_until(check_at).await;
        }
    }
}

/// A request inside its handler; dropping it (the response is ready, or the connection went
/// away mid-request) makes the connection idle again.
struct InHandler(Arc<Conn>);

impl Drop for InHandler {
    fn drop(&mut self) {
        let mut a = self.0.activity.lock().expect("activity lock");
        a.in_handler -= 1;
        if a.in_handler == 0 {
            a.idle_since = Instant::now();
        }
    }
}

async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State(shared): State<Arc<Shared>>) -> Response {
    if shared.state.ready.load(Ordering::Acquire) {
        let body = match shared.state.leadership.as_ref().map(|l| l.role()) {
            None => "ready".to_string(),
            Some(Role::Leader) => "ready: leader".to_string(),
            Some(Role::Follower { leader: None }) => "ready: follower".to_string(),
            Some(Role::Follower { leader: Some(l) }) => format!("ready: follower, leader {l}"),
        };
        (StatusCode::OK, body).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: the repository cannot be fetched (yet)",
        )
            .into_response()
    }
}

async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    (
        [(header::CONTENT_TYPE, HeaderValue::from_static(OPENMETRICS_CONTENT_TYPE))],
        shared.state.metrics.encode(),
    )
        .into_response()
}

async fn webhook(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    let state = &shared.state;
    let Some(secret) = state.webhook_secret.as_deref() else {
        return (StatusCode::NOT_FOUND, "webhooks are not enabled").into_response();
    };
    let forge = match webhook::verify(&headers, &body, secret) {
        Ok(forge) => forge,
        Err(err) => {
            tracing::warn!(error = %err, "webhook refused");
            return (StatusCode::UNAUTHORIZED, "webhook signature missing or invalid").into_response();
        }
    };
    // Only a verified request is remembered: a forged one must not be able to fill the cache
    // with the IDs of deliveries still to come.
    let delivery = webhook::delivery_id(forge, &headers);
    if let Some(id) = delivery
        && !shared.deliveries.lock().expect("deliveries lock").first_time(id)
    {
        tracing::info!(%forge, delivery = id, "webhook delivery seen before; ignored");
        return (StatusCode::OK, "duplicate delivery, ignored").into_response();
    }
    let git_ref = webhook::pushed_ref(forge, &body);
    tracing::info!(%forge, delivery = delivery.unwrap_or("-"), git_ref = git_ref.as_deref().unwrap_or("-"), "webhook received");
    match state.trigger.try_send(Trigger::Webhook { forge, git_ref }) {
        Ok(()) => {}
        Err(mpsc::error::TrySendError::Full(_)) => {
            tracing::debug!("a reconcile is already pending; webhook coalesced");
        }
        Err(mpsc::error::TrySendError::Closed(_)) => {
            // Not taken: let the forge's retry of this delivery through.
            if let Some(id) = delivery {
                shared.deliveries.lock().expect("deliveries lock").forget(id);
            }
            return (StatusCode::SERVICE_UNAVAILABLE, "shutting down").into_response();
        }
    }
    (StatusCode::ACCEPTED, "accepted").into_response()
}
