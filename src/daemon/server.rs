//! The daemon's HTTP server: health, readiness, metrics and the push webhook.
//!
//! - `GET /healthz`: 200 `ok` while the process serves.
//! - `GET /readyz`: 200 once `ready` is set (the first successful fetch), 503 before.
//! - `GET /metrics`: OpenMetrics text.
//! - `POST /webhook`: 404 when no secret is configured (webhooks off); 401 when the signature is
//!   missing or wrong, and nothing is triggered; 202 when verified, with a [`Trigger`] sent
//!   without waiting (a full channel means a reconcile is already pending, which is as good).
//!   Bodies are limited to [`WEBHOOK_BODY_LIMIT`].

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tokio::sync::mpsc;

use super::metrics::Metrics;
use super::webhook::{self, Forge};

/// The largest webhook body accepted (forges send push payloads of a few KiB to a few hundred).
pub const WEBHOOK_BODY_LIMIT: usize = 1024 * 1024;

pub const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

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
}

impl fmt::Debug for ServerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerState")
            .field("ready", &self.ready.load(Ordering::Relaxed))
            .field("webhook_secret", &self.webhook_secret.as_ref().map(|_| "<redacted>"))
            .finish_non_exhaustive()
    }
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
        .with_state(Arc::new(state))
}

/// Serves until `shutdown` completes, then stops accepting and lets requests in flight finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: ServerState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, webhook = state.webhook_secret.is_some(), "HTTP server listening");
    }
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State(state): State<Arc<ServerState>>) -> Response {
    if state.ready.load(Ordering::Acquire) {
        (StatusCode::OK, "ready").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready: no successful fetch yet").into_response()
    }
}

async fn metrics(State(state): State<Arc<ServerState>>) -> Response {
    (
        [(header::CONTENT_TYPE, HeaderValue::from_static(OPENMETRICS_CONTENT_TYPE))],
        state.metrics.encode(),
    )
        .into_response()
}

async fn webhook(State(state): State<Arc<ServerState>>, headers: HeaderMap, body: Bytes) -> Response {
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
    let git_ref = webhook::pushed_ref(forge, &body);
    tracing::info!(%forge, git_ref = git_ref.as_deref().unwrap_or("-"), "webhook received");
    match state.trigger.try_send(Trigger::Webhook { forge, git_ref }) {
        Ok(()) => {}
        Err(mpsc::error::TrySendError::Full(_)) => {
            tracing::debug!("a reconcile is already pending; webhook coalesced");
        }
        Err(mpsc::error::TrySendError::Closed(_)) => {
            return (StatusCode::SERVICE_UNAVAILABLE, "shutting down").into_response();
        }
    }
    (StatusCode::ACCEPTED, "accepted").into_response()
}
