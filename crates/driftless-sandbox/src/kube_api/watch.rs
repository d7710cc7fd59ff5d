//! `?watch=true`: a stream of `{"type": "ADDED"|"MODIFIED"|"DELETED", "object": ...}` lines,
//! from the state at the request (every object as ADDED unless a resourceVersion other than
//! `0` was given) and then each change seen by polling the store, until `timeoutSeconds` (at
//! most five minutes) or the client goes.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::Response;
use serde_json::{Value, json};

use super::handlers::{Query, Selector, served};
use super::objects::Objects;
use super::resources::Resource;
use super::{Shared, status};

const POLL: Duration = Duration::from_millis(200);

/// What a watch sees at one moment.
pub type Snapshot = Arc<dyn Fn() -> Vec<Value> + Send + Sync>;

/// Watch a stored resource.
pub async fn watch(shared: &Shared, res: Resource, namespace: Option<String>, query: Query) -> Response {
    let state_dir = shared.state_dir.clone();
    let r = res.clone();
    let snapshot: Snapshot = Arc::new(move || {
        Objects::new(&state_dir)
            .list(&r.group, &r.plural, namespace.as_deref())
            .into_iter()
            .map(|e| served(&r, &e.object))
            .collect()
    });
    stream(snapshot, query)
}

fn key(o: &Value) -> String {
    format!(
        "{}/{}",
        o["metadata"]["namespace"].as_str().unwrap_or(""),
        o["metadata"]["name"].as_str().unwrap_or("")
    )
}

/// The watch stream over any snapshot function (stored objects, nodes, pods).
pub fn stream(snapshot: Snapshot, query: Query) -> Response {
    let selector = match Selector::from_query(&query) {
        Ok(s) => s,
        Err(e) => return status(400, "BadRequest", &e, None),
    };
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .unwrap_or(300)
        .min(300);
    let send_initial = matches!(query.get("resourceVersion"), None | Some("" | "0"));
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(64);
    tokio::spawn(async move {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout);
        let take = |s: &Snapshot| -> BTreeMap<String, Value> {
            s().into_iter()
                .filter(|o| selector.matches(o))
                .map(|o| (key(&o), o))
                .collect()
        };
        let mut seen = take(&snapshot);
        let line = |kind: &str, o: &Value| {
            let mut b = serde_json::to_vec(&json!({"type": kind, "object": o})).unwrap_or_default();
            b.push(b'\n');
            Bytes::from(b)
        };
        if send_initial {
            for o in seen.values() {
                if tx.send(line("ADDED", o)).await.is_err() {
                    return;
                }
            }
        }
        while tokio::time::Instant::now() < deadline {
            tokio::time::sleep(POLL).await;
            let now = take(&snapshot);
            let mut events = Vec::new();
            for (k, o) in &now {
                match seen.get(k) {
                    None => events.push(line("ADDED", o)),
                    Some(old) if old["metadata"]["resourceVersion"] != o["metadata"]["resourceVersion"] => {
                        events.push(line("MODIFIED", o))
                    }
                    _ => {}
                }
            }
            for (k, o) in &seen {
                if !now.contains_key(k) {
                    events.push(line("DELETED", o));
                }
            }
            for e in events {
                if tx.send(e).await.is_err() {
                    return;
                }
            }
            seen = now;
        }
    });
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<Bytes, Infallible>(b), rx))
    });
    let mut r = Response::new(Body::from_stream(body));
    *r.status_mut() = StatusCode::OK;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache, private"));
    r
}
